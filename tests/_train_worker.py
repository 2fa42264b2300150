"""Subprocess for the kill-and-resume test: trains with a TrainConfig given as JSON and logs every step to stdout.

Usage: python _train_worker.py BASE_MODEL INSTANCE_DIR PRIOR_DIR OUT CONFIG_JSON
The test reads the "step k/N" lines as they are flushed and SIGKILLs this process at a step of its choosing.
"""

import logging
import sys

from dreambooth_lib import train
from dreambooth_lib.config import TrainConfig


def main() -> None:
    base_model, instance_dir, prior_dir, out, config_json = sys.argv[1:6]
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("dreambooth_lib.train").setLevel(logging.INFO)  # a StreamHandler flushes every record
    config = TrainConfig.model_validate_json(config_json)
    train.run(base_model, instance_dir, prior_dir, "sks", "square", config, out)


if __name__ == "__main__":
    main()
