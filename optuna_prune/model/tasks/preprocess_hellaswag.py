"""HellaSwag items that are already in lm-eval's processed form (query, choices, label).

The offline copy was made with a cleanup close to lm-eval's; applying lm-eval's own ``preprocess`` again
(a no-op on clean text) removes the few bracketed WikiHow artefacts left, so every prompt and ending is
exactly what the built-in ``hellaswag`` task scores.
"""

from __future__ import annotations

from typing import Any

from lm_eval.tasks.hellaswag.utils import preprocess


def process_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": preprocess(doc["query"]),
        "choices": [preprocess(ending) for ending in doc["choices"]],
        "gold": int(doc["label"]),
    }


def process_docs(dataset: Any) -> Any:
    return dataset.map(process_doc)
