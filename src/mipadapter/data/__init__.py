"""Training-set construction: caption, ground, segment, score (the paper's object quality score), select.

Library entry points (the CLI's `mipadapter data build|score|merge` call these):

    build_dataset(input, output, config)   raw images (SA-1B tars or a folder) -> manifest + masks + selection
    score_dataset(input, output, config)   an existing set in the authors' layout -> manifest + selection
    merge_dataset(output)                  redo the final merge (e.g. another top-K)

Stages are replaceable backends (`Backends`, protocols in `stages`); the transformers ones are loaded
by `mipadapter.data.backends.load_backends`. The score functions live in `mipadapter.ops.quality`,
the manifest schema in `mipadapter.manifest`, the object rules in `mipadapter.object_filters`.
"""

from mipadapter.data.config import DataConfig, data_config_from_dict, load_data_config
from mipadapter.data.runner import IncompleteRunError, Report, build_dataset, merge_dataset, score_dataset
from mipadapter.data.stages import Backends, Captioner, Detection, Embedder, Grounder, Segmenter

__all__ = [
    "Backends",
    "Captioner",
    "DataConfig",
    "Detection",
    "Embedder",
    "Grounder",
    "IncompleteRunError",
    "Report",
    "Segmenter",
    "build_dataset",
    "data_config_from_dict",
    "load_data_config",
    "merge_dataset",
    "score_dataset",
]
