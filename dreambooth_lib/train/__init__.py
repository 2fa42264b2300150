"""Fine-tuning (the paper's Eq. 2) for one subject or K packed subjects: data, step, loss, resume, CUDA graphs."""

from dreambooth_lib.train.data import list_png
from dreambooth_lib.train.loop import (
    MODEL_MARKER_NAME,
    SUMMARY_NAME,
    LossTracker,
    Trainer,
    TrainResult,
    checkpoint_key,
    draw_batch,
    draw_step_batch,
    make_optimizer,
    publish,
    run,
    setup_training,
    speed_options,
    step_on_batch,
    train_step,
)
from dreambooth_lib.train.loss import dreambooth_loss
