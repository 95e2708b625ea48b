"""Checking that a sentence-transformers folder asks for nothing Lockstep would skip when encoding.

Lockstep runs a folder's transformer, its pooling and L2 normalisation. A pipeline
(`modules.json`) with any other module, a Dense projection say, a prompt that
sentence-transformers prepends to every text (`default_prompt_name`), lower-casing
(`do_lower_case`), a dot-product or distance similarity over vectors the pipeline
does not normalise, or pooling that leaves the prompt's tokens out would make
Lockstep's vectors or rankings differ from what sentence-transformers computes for the
same model, silently, so such folders are refused when loaded.

Query and document prompts (e5's "query: " and "passage: ", bge's instruction) are
applied as sentence-transformers' `encode_query` and `encode_document` apply them
(`read_prompts`): the document prompt is the first of "document", "passage" and
"corpus" the folder names, as in sentence-transformers 5 (version 6 reads only a
"document" prompt unless a caller names another, so an e5 folder's "passage: " would
go unused there). A model Lockstep saves names it "document", which every version
reads. Other named prompts are applied by sentence-transformers only when a caller
names one; Lockstep does not, and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.errors import InvalidInput

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # the names encode_document tries, in its order
RUN_MODULES = ("Transformer", "Pooling", "Normalize")  # class names; the module path moves between versions


def _runs(module_type: object) -> bool:
    return (isinstance(module_type, str) and module_type.startswith("sentence_transformers.")
            and module_type.rsplit(".", 1)[-1] in RUN_MODULES)


def check_pipeline(model_dir: Path) -> None:
    """InvalidInput naming the module or prompt of `model_dir` that Lockstep would not apply (see the module doc)."""
    modules = _read_json(model_dir / MODULES_FILE)
    normalised = True
    if modules is not None:
        if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
            raise InvalidInput(f"{model_dir / MODULES_FILE}: expected a list of module objects")
        skipped = [module.get("type", "?") for module in modules if not _runs(module.get("type"))]
        if skipped:
            raise InvalidInput(
                f"{model_dir}: its sentence-transformers pipeline includes {', '.join(map(str, skipped))}, which "
                f"Lockstep does not run (it runs Transformer, Pooling and Normalize), so its vectors would differ "
                "from sentence-transformers'; use a model whose pipeline has only those"
            )
        normalised = any(str(module.get("type", "")).endswith(".Normalize") for module in modules)
    transformer = _read_json(model_dir / TRANSFORMER_CONFIG_FILE)
    if isinstance(transformer, dict) and transformer.get("do_lower_case"):
        raise InvalidInput(
            f"{model_dir}: {TRANSFORMER_CONFIG_FILE} sets do_lower_case, so sentence-transformers lower-cases every "
            "text before tokenizing, which Lockstep does not; use a model with an uncased tokenizer instead"
        )
    config = _read_json(model_dir / ST_CONFIG_FILE)
    if not isinstance(config, dict):
        return
    applied = read_prompts(model_dir)
    if any(applied.values()) and _pooling_config(model_dir, modules).get("include_prompt") is False:
        raise InvalidInput(
            f"{model_dir}: its pooling leaves the prompt's tokens out (include_prompt false), which Lockstep does not "
            "do; use a model whose pooling includes them"
        )
    similarity = config.get("similarity_fn_name")
    if not normalised and similarity not in (None, "cosine"):
        raise InvalidInput(
            f"{model_dir}: the model scores with {similarity!r} similarity over vectors its pipeline does not "
            "normalise, while Lockstep normalises every vector and ranks by cosine, so rankings would differ; "
            "use a model trained for cosine similarity"
        )
    prompts = {name: text for name, text in (config.get("prompts") or {}).items() if text}
    default = config.get("default_prompt_name")
    if default:
        raise InvalidInput(
            f"{model_dir}: sentence-transformers prepends its default prompt {default!r} "
            f"({prompts.get(default, '')!r}) to every text, which Lockstep does not; set default_prompt_name to null "
            f"in {ST_CONFIG_FILE} to encode without it, or use another model"
        )
    others = sorted(set(prompts) - {"query", *DOCUMENT_PROMPTS})
    if others:
        log.warning("%s declares prompts %s, which sentence-transformers applies only when a caller names one; "
                    "Lockstep applies only the query and document prompts", model_dir, others)


def read_prompts(model_dir: Path) -> dict[str, str]:
    """`query_prompt` and `document_prompt` as `encode_query` and `encode_document` pick them from the folder's
    prompts: "query", and the first of `DOCUMENT_PROMPTS` present; "" where there is none."""
    config = _read_json(model_dir / ST_CONFIG_FILE)
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if not prompts:
        return {}
    if not isinstance(prompts, dict) or not all(isinstance(text, str) for text in prompts.values()):
        raise InvalidInput(f"{model_dir / ST_CONFIG_FILE}: prompts must map names to strings")
    document = next((prompts[name] for name in DOCUMENT_PROMPTS if name in prompts), "")
    return {"query_prompt": prompts.get("query", ""), "document_prompt": document}


def _pooling_config(model_dir: Path, modules: object) -> dict:
    """The pooling module's config (its folder named in `modules.json`, else `1_Pooling`), {} if absent."""
    folder = next((module.get("path") for module in modules or () if str(module.get("type", "")).endswith(".Pooling")),
                  "1_Pooling")
    config = _read_json(model_dir / str(folder) / "config.json")
    return config if isinstance(config, dict) else {}


def _read_json(path: Path) -> object | None:
    """The parsed file, None if absent; InvalidInput naming the file if it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc}); restore the model folder's file") from exc
