"""The names under which metrics and tags are reported to Ray and MLflow, in one place.

Training reports the metrics every epoch; the search ranks trials by one of them; the registry and the
job summary read them back from checkpoints and runs. A metric named twice in two spellings would be a
silently empty curve, so every reader and writer takes its name from here. Prefixes group the metrics:
``train/`` losses and speed of an epoch, ``val/`` scores of the EMA main branch, ``data/`` samples
skipped by the loader, ``hp/`` the loss settings a run really used, ``pgi/`` gradient diagnostics.
"""

# per-epoch metrics
EPOCH = "epoch"
MAP = "val/map50_95"  # COCO mAP@0.5:0.95 of the EMA model's main branch (the search's default metric)
MAP50 = "val/map50"
# the rest of the 12 COCO numbers (pycocotools' summary, area "all" and 100 detections unless named)
MAP75 = "val/map75"
MAP_SMALL, MAP_MEDIUM, MAP_LARGE = "val/map_small", "val/map_medium", "val/map_large"
AR1, AR10, AR100 = "val/ar1", "val/ar10", "val/ar100"
AR_SMALL, AR_MEDIUM, AR_LARGE = "val/ar_small", "val/ar_medium", "val/ar_large"
# metric name of each of pipeline.evaluation.coco.STATS
COCO_METRICS = {
    "map50_95": MAP,
    "map50": MAP50,
    "map75": MAP75,
    "map_small": MAP_SMALL,
    "map_medium": MAP_MEDIUM,
    "map_large": MAP_LARGE,
    "ar1": AR1,
    "ar10": AR10,
    "ar100": AR100,
    "ar_small": AR_SMALL,
    "ar_medium": AR_MEDIUM,
    "ar_large": AR_LARGE,
}
BEST_MAP = "val/best_map50_95"
TRAIN_TOTAL = "train/total"
TRAIN_LR = "train/lr"
IMAGES_PER_S = "train/images_per_s"
WORLD_SIZE = "train/world_size"  # workers that trained the epoch (at its end; elastic runs resize)
RESIZED_FROM = "train/resized_from"  # logged at the first epoch after a resize: the workers before it
LOADER_WAIT = "train/loader_wait_fraction"
MOSAIC = "train/mosaic"
HP_AUX_WEIGHT = "hp/aux_weight"
HP_LEAD_WEIGHT = "hp/lead_weight"
HP_TAL_TOPK = "hp/tal_topk"
HP_LR0 = "hp/lr0"
TRAIN_PREFIX, DATA_PREFIX, VAL_PREFIX = "train/", "data/", "val/"
PGI_PREFIX = "pgi/"  # gradient diagnostics: pgi/<stage>/<statistic> (pipeline/training/pgi_diagnostics.py)
LOSS_PARTS = ("box", "cls", "dfl")  # suffixes of the per-branch loss metrics (train/main_box, ...)
SKIPPED_STEPS = "train/skipped_steps"  # steps skipped for a non-finite loss or gradients
AMP_SKIPPED_STEPS = "train/amp_skipped_steps"  # optimizer steps the fp16 loss scaler skipped (overflow)
EPOCH_END_TIME = "epoch_end_time"  # Unix seconds; the MLflow timestamp of the epoch's metrics, not a metric
STOP_CAUSE = "stop_cause"  # a run that ended early (diverged): the one-line cause, not a metric
PREEMPTED = "preempted"  # a mid-epoch report after SIGTERM (its checkpoint holds the loader position)

# tags of training runs
RUN_NAME_TAG = "ray.run_name"
STORAGE_TAG = "ray.storage_path"
RAY_JOB_TAG = "ray.job_id"
BEST_CHECKPOINT_TAG = "best_checkpoint"
MANIFEST_HASH_TAG = "dataset.manifest_hash"
VAL_MANIFEST_HASH_TAG = "dataset.val_manifest_hash"

# starting weights of a training run (model.weights): params, and lineage tags (also on registered versions)
PRETRAINED_LOADED = "pretrained.tensors_loaded"
PRETRAINED_REINITIALISED = "pretrained.tensors_reinitialised"
PRETRAINED_FRESH = "pretrained.tensors_fresh"
PRETRAINED_SOURCE_TAG = "pretrained.source"  # model.weights as given (a path or an MLflow URI)
PRETRAINED_PATH_TAG = "pretrained.path"  # the file or checkpoint directory it resolved to
LINEAGE_SHA256_TAG = "lineage.sha256"  # sha256 of the file a run started from / a version came from
SOURCE_CHECKPOINT_TAG = "checkpoint"  # on a registered version: the file it was made from
VERSION_MAP_TAG = "map50_95"  # on a registered version: its verified val mAP@0.5:0.95 (the champion's score)
VERSION_MAP50_TAG = "map50"
PROMOTION_TAG = "promotion"  # on a registered version: why the champion alias did or did not move to it

# tags of a search's runs
SEARCH_TAG = "tune.name"  # on the parent run
TRIAL_ID_TAG = "tune.trial_id"
TRIAL_STATUS_TAG = "trial.status"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
# a trial's status (TRIAL_STATUS_TAG and the trials table): running while it trains, then one of the others
TRIAL_RUNNING = "running"
TRIAL_COMPLETED = "completed"  # trained every epoch
TRIAL_STOPPED = "stopped early"  # by the scheduler (ASHA)
TRIAL_ERRORED = "errored"

# artifacts of training runs (file names in the run's artifact root)
PER_CLASS_CSV = "val_per_class.csv"  # per-class AP50-95 and AP50
PR_CURVES_PNG = "val_pr_curves.png"  # precision-recall curve per class
CONFUSION_PNG = "val_confusion_matrix.png"
PREDICTIONS_PNG = "val_predictions.png"
PGI_PNG = "pgi_gradients.png"  # the gradient diagnostics per stage and epoch (train.pgi_diagnostics_every)
