"""Sources read through the Hugging Face `datasets` library: a folder written by `save_to_disk`, and a
hub data set id. Each gives (name, row number, record) rows. And what every Arrow source (these, and
parquet files) needs undone in its rows: `arrow_record`."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

NEEDS = "needs the 'datasets' package (pip install 'tunesmith[data]')"


def read_saved(path: Path, split: str) -> list[tuple[str, int, dict]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise UserError(f"{path}: a saved data set folder {NEEDS}") from None
    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # a damaged dataset_info.json, dataset_dict.json or arrow file: several types
        raise UserError(f"{path}: not a readable saved data set ({type(err).__name__}: {str(err)[:160]})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{path}: saved dataset has no split '{split}' (has {', '.join(dataset)}); set data.hub_split")
        dataset = dataset[split]
    return _dataset_rows(dataset, str(path))


def read_hub(spec: str, split: str) -> list[tuple[str, int, dict]]:
    """A data set from the Hugging Face hub (or its local cache). Where `spec` is not marked `hf:`, it may
    be a mistyped local path: the error says that no such file or folder exists either."""
    name = spec.removeprefix("hf:")
    local = "" if spec.startswith("hf:") else (f"; no local file or folder of that name either (a relative path "
                                               f"is read from the current folder, {Path.cwd()})")
    try:
        from datasets import config, load_dataset
    except ImportError:
        raise UserError(f"{name}: hub data sets {NEEDS}{local}") from None
    if not config.HF_HUB_OFFLINE and _unreachable(name):
        raise UserError(f"{name}: cannot load hub data set: the hub is not reachable (no network address for its "
                        f"host) and the data set is not in the local cache{local}")
    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # network, missing data set or split: all end as one user-facing line
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{name}: cannot load hub data set ({why}){local}") from None
    return _dataset_rows(dataset, name)


def _unreachable(name: str) -> bool:
    """Without network, load_dataset retries the hub for half a minute (huggingface_hub has no setting
    for it; HF_HUB_OFFLINE reads the cache at once): refuse at once where the hub's host has no address
    and the data set was never downloaded (its card is in the hub cache where it was)."""
    from huggingface_hub import try_to_load_from_cache

    from ..models.load import hub_unreachable

    return hub_unreachable() and not isinstance(try_to_load_from_cache(name, "README.md", repo_type="dataset"), str)


def _dataset_rows(dataset, name: str) -> list[tuple[str, int, dict]]:
    # Media stays undecoded, in lists and nested records too: training reads text, and decoding an
    # image or audio value would open whatever path or address a row names (a saved data set from
    # elsewhere can name any).
    from datasets import Features

    features = dict(dataset.features)
    wanted = undecoded(features)
    if wanted != features:
        dataset = dataset.cast(Features(wanted))
    return [(name, index, arrow_record(dict(row))) for index, row in enumerate(dataset, 1)]


FREE_FORM = ("tools", "tool_calls")  # values whose keys are the user's own: JSON Schemas, a call's arguments


def arrow_record(record: dict) -> dict:
    """A row read from Arrow (parquet, a saved or hub data set) without the nulls Arrow invented in its
    tools and tool calls. Arrow gives a column of objects one struct type, the union of every row's
    keys, and fills a key a row lacks with null: a record declaring get_weather(city) then read
    `"properties": {"city": ..., "query": null}` (another record's parameter, not valid JSON Schema, so
    the argument check was skipped) and its calls `{"city": "Rome", "query": null}`, which was trained.
    Inside `tools` and `tool_calls` (a message's, at any depth) a null-valued key is dropped: Arrow cannot
    tell it from an absent one, and there it is almost always one. Elsewhere a null stays (a null
    `weight` or `content` is read as before); JSON Lines files are not read through Arrow and keep theirs."""
    return {key: _free_form(value) if _is_free_form(key) else _within(value) for key, value in record.items()}


def _is_free_form(key) -> bool:
    return isinstance(key, str) and key.strip().lower() in FREE_FORM


def _within(value):
    """Looks for tools / tool_calls in lists and objects (messages, chosen / rejected sides)."""
    if isinstance(value, dict):
        return arrow_record(value)
    if isinstance(value, list):
        return [_within(item) for item in value]
    return value


def _free_form(value):
    if isinstance(value, dict):
        return {key: _free_form(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_free_form(item) for item in value]
    return value


def undecoded(feature):
    """A data set feature (a column's type) with every decodable part (Image, Audio, Video...) set not to decode."""
    import dataclasses

    if isinstance(feature, dict):
        return {key: undecoded(value) for key, value in feature.items()}
    if isinstance(feature, (list, tuple)):
        return type(feature)(undecoded(value) for value in feature)
    if not dataclasses.is_dataclass(feature):
        return feature
    if getattr(feature, "decode", None) is True:
        return dataclasses.replace(feature, decode=False)
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence: their items' type
    return dataclasses.replace(feature, feature=undecoded(inner)) if inner is not None else feature
