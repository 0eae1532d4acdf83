"""The radiologists' web page: worklist, study evidence, labels, models (thyrocad web)."""
