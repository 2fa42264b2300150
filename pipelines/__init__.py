"""Kubeflow pipelines wiring the components: personalize (one subject), batch_personalize (many)."""
