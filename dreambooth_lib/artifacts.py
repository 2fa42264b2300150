"""Every file name of the step contract, once: what each step writes and what the next step, the registry or a
user reads. The layouts these names live in are in docs/architecture.md."""

# ingest: <out>/NN.png and
INGEST_MANIFEST_NAME = "manifest.json"

# identifier (a run directory's record of the chosen identifier)
IDENTIFIER_NAME = "identifier.json"

# prior: <root>/<prior_set_key>/NNNNNN.png and the set's record; the prior_set artifact of the pipelines holds a
# reference to the set (and the images, when sampled into the artifact)
PRIOR_SET_RECORD_NAME = "prior_set.json"
PRIOR_SET_REF_NAME = "prior_set_ref.json"

# train: <out>/model/ and then <out>/train_summary.json (written last: its presence means the run finished)
MODEL_FOLDER = "model"
SUMMARY_NAME = "train_summary.json"
MODEL_MARKER_NAME = "dreambooth_model.json"  # inside a full model's folder
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights reads
LORA_MARKER_NAME = "dreambooth_lora.json"  # beside the LoRA weights: base model, identifier, rank, alpha
CHECKPOINT_MANIFEST_NAME = "checkpoint_manifest.json"  # inside step-XXXXXXX/, written last

# generate
GENERATE_RECORD_NAME = "generate.json"

# evaluate
METRICS_NAME = "metrics.json"
# what an evaluator is, for the report: {"evaluator": ...} inside its folder, or <stem>.evaluator.json beside a file
EVALUATOR_LABEL_NAME = "evaluator.json"
REPORT_NAME = "report.html"

# a run directory (dreambooth run)
RUN_CONFIG_NAME = "config.json"
RUN_PRIOR_NAME = "prior.json"  # the prior set the run trained with (prior.PriorResult)
RUN_RESULT_NAME = "run_result.json"

# registry: <root>/index.json, <root>/<subject>/<version>/{model/, model_card.md, lineage.json, report.html, samples/}
REGISTRY_INDEX_NAME = "index.json"
MODEL_CARD_NAME = "model_card.md"
LINEAGE_NAME = "lineage.json"
SAMPLES_FOLDER = "samples"

# batch: <batch_root>/<job_id>/{status/, packed.json, summary.md, summary.json}
PACKED_RECORD_NAME = "packed.json"
BATCH_SUMMARY_MD_NAME = "summary.md"
BATCH_SUMMARY_JSON_NAME = "summary.json"
