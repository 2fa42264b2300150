"""Fine-tuning (the paper's Eq. 2) for one subject or K packed subjects: data, trainer, step, loss, resume, CUDA
graphs, export. `run` trains one subject; `multi_subject.train_packed_subjects` trains many, K per batch."""

from dreambooth_lib.train.export import MODEL_MARKER_NAME, SUMMARY_NAME
from dreambooth_lib.train.loop import run, train_subjects
from dreambooth_lib.train.results import SubjectOutcome, TrainResult
from dreambooth_lib.train.select import selection_metrics
from dreambooth_lib.train.subjects import TrainSubject
