"""Data: DomainBed and CoOp layouts with the authors' splits, prompts and preprocessing, the
input pipeline (decode, crop and resize on workers, per-pixel work on the device), the
synthetic demo set, step-indexed batches."""
from .decode import CorruptImageError
from .domainbed import DATASETS, DataError
from .pipeline import DeviceBatches, ImageItems, collate, eval_loader, load_images, train_loader, worker_count
from .preprocess import KINDS, preprocessing, reference_eval, reference_train
from .samples import StepBatches
from .synthetic import write_synthetic
from .tasks import EvalSet, Task, build_task

__all__ = ["DATASETS", "KINDS", "CorruptImageError", "DataError", "DeviceBatches", "EvalSet", "ImageItems",
           "StepBatches", "Task", "build_task", "collate", "eval_loader", "load_images", "preprocessing",
           "reference_eval", "reference_train", "train_loader", "worker_count", "write_synthetic"]
