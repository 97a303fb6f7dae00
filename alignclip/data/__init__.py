"""Data: DomainBed and CoOp layouts with the authors' splits, prompts and transforms, the
synthetic demo set, step-indexed batches."""
from .domainbed import DATASETS, DataError
from .samples import CorruptImageError, SampleDataset, StepBatches, eval_transform, normalization, train_transform
from .synthetic import write_synthetic
from .tasks import EvalSet, Task, build_task

__all__ = ["DATASETS", "CorruptImageError", "DataError", "EvalSet", "SampleDataset", "StepBatches",
           "Task", "build_task", "eval_transform", "normalization", "train_transform", "write_synthetic"]
