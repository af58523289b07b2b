"""marsseg: Mars terrain segmentation with k-fold U-Net ensembles.

Module map, lowest layer first; each module imports only from the ones above it
(`tests/test_layering.py` fails on an import cycle, function-local imports included)::

    errors          InputError: bad input, one line, exit code 2; RunError: stopped from outside, exit 1
    _io _lock       atomic writes, sha256, the name rule and confined paths, free space,
                    dead writers' leftovers; file and folder locks
    _progress       the terminal: training board, progress bar, a fold's progress events
    _cores          idle-core sharing between the folds of one node
    data/           a leaf: the course npz, cleaning flags, HDF5 shards and dataset.json,
                    batch streams with their checks, in-memory training loaders and the
                    rare-class sampler (which training images an epoch draws)
    records         frozen records of done.json (Done) and ensemble.json (EnsembleSpec: members,
                    folds, calibration; key order and unknown keys kept); checks of splits.json
    runfolder       every file of a run folder: names, readers, writers, lock, data fingerprint
    confine         outputs never touch inputs: an --out inside what a command reads
    config          recipes (what to learn): frozen dataclasses parsed strictly from TOML
    device          the one authority on device and precision (the auto rule, autocast, Accelerator)
    models/         networks: registry, U-Net, blocks; save_pretrained / load_pretrained
    losses metrics  losses (and a member's loss); the course metric and confusion matrices
    augment folds   training augmentation; seeded grouped k-fold splits and fold rows
    optim           a fold's optimizer and learning-rate schedule
    checkpoint      TrainerState and a fold's state/: what it saves every epoch, checks, resumes from
    dataparallel    a fold as N torch.distributed processes: global-batch BatchNorm, rank seeds
    budget          --time-budget: a fold's epochs from a timing probe
    student         student recipes (distill): one member plus the [distill] table
    teaching        a fold taught by a teacher: the targets file, its streaming loaders, the loss
    tracking        --log-with: accelerate's trackers, one tracked run per fold, grouped per run
    validation      a fold's validation confusion matrix (sharded loaders too), out-of-fold softmax
    train           train_one_fold: the accelerate loop, written out in phases
    oof             out-of-fold scores of finished folds: the run's ensemble file
    reuse           train-folds --reuse: finished folds of other run folders, adopted when
                    provably the folds this recipe would train (first difference named)
    raytrain        --workers-per-fold N: one fold as a Ray Train TorchTrainer of N workers
    orchestrate     train-folds: (member, fold) tasks on Ray (cluster: starting/joining Ray)
    temperature     calibration: temperatures fitted on the out-of-fold files (calibrate),
                    stored as the ensemble file's calibration block; softmax(ln p / T)
    ensemble        the loaded ensemble: fold networks and their weights and temperatures
    cache           a fold's conversion cache: manifest, verification before a load, prune
    quantize        int8 calibration images in the static shape
    backends        eager / compiled / OpenVINO networks, converted once per fold folder
    inference       the Predictor: an ensemble with flip TTA on batches of images
    teacher         a teacher run's targets, made once: out-of-fold and TTA probabilities
    submission      the submission CSV: writer, validator, reader
    predict         the predict command's driver: stream -> Predictor -> CSV (+ probs.h5)
    evaluate        scores of folds, ensemble and ensemble+TTA on labeled data
    report          plots: confusion, per-class IoU, training curves, overlays, reliability
    select          member weights by out-of-fold score (greedy forward selection), then calibrate
    distill         one student network taught by a k-fold teacher ensemble
    synth           synthetic course-layout data for demos and tests
    cli/            the typer app, one file per command (installed as marsseg.cli)
"""

__version__ = "0.1.0"

CLASS_NAMES = ("Background", "Soil", "Bedrock", "Sand", "Big Rock")
NUM_CLASSES = 5
IMAGE_SHAPE = (64, 128)
