"""marsseg: Mars terrain segmentation with k-fold U-Net ensembles."""

__version__ = "0.1.0"

CLASS_NAMES = ("Background", "Soil", "Bedrock", "Sand", "Big Rock")
NUM_CLASSES = 5
IMAGE_SHAPE = (64, 128)
