"""Where a registry keeps things: the index and each version's files, named once.

Under the root (a local folder or a gs:// prefix):

    index.json                          the list of entries, one per claimed version: the commit point
    <subject>/<version>/model/          the weights, copied from the trained model (diffusers or LoRA folder)
    <subject>/<version>/model_card.md   Hugging Face-style card: YAML front matter, how to prompt, metrics...
    <subject>/<version>/lineage.json    every input URI and digest, the configs, the code version, the time
    <subject>/<version>/report.html     the evaluation report, when there is one
    <subject>/<version>/samples/NN.png  the sample images the card shows
"""

from __future__ import annotations

from dreambooth_lib import storage
from dreambooth_lib.artifacts import LINEAGE_NAME, MODEL_FOLDER, REPORT_NAME, SAMPLES_FOLDER
from dreambooth_lib.artifacts import MODEL_CARD_NAME as CARD_NAME

MAX_CARD_SAMPLES = 8


def version_files(version_uri: str, with_report: bool) -> dict[str, str | None]:
    """The URIs of a version's model folder, card, lineage and report (None without a report)."""
    return {
        "model_uri": storage.join(version_uri, MODEL_FOLDER),
        "card_uri": storage.join(version_uri, CARD_NAME),
        "lineage_uri": storage.join(version_uri, LINEAGE_NAME),
        "report_uri": storage.join(version_uri, REPORT_NAME) if with_report else None,
    }


def sample_path(index: int, source: str) -> str:
    """The version-relative path of the index-th sample image; it keeps the source's image suffix."""
    suffix = "." + source.rsplit(".", 1)[-1].lower() if "." in storage.basename(source) else ".png"
    return f"{SAMPLES_FOLDER}/{index:02d}{suffix}"
