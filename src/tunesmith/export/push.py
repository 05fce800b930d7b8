"""`tunesmith push RUN REPO_ID`: a finished run's adapter or merged model, with its model card, to the
Hugging Face Hub (or to any server of the Hub's HTTP API: --endpoint / HF_ENDPOINT).

The folder is built by `tunesmith export` (the merge checked as there) in a scratch folder inside
the run (same disk as the weights, so a full model is hard-linked, not copied) and removed after."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..progress import say
from ..runlock import refuse_links
from ..runs import RunFolder
from .card import base_model_facts, model_card

WHAT = ("adapter", "merged")


def push(run: str | Path, repo_id: str, what: str | None = None, private: bool = False, revision: str = "main",
         token: str | None = None, endpoint: str | None = None) -> str:
    """Upload the run's adapter (default for adapter methods) or merged model (default for full
    fine-tunes) with a model card; returns the repo's URL."""
    from huggingface_hub import constants, get_token

    run = finished_run(run)
    refuse_links(run.path, "push uploads only the run's own files, never what a link points to")
    what = choose_what(run, what)
    token = token or get_token()  # HF_TOKEN, then the stored login
    if not token:
        raise UserError("push: no Hugging Face token; set HF_TOKEN or log in with `hf auth login` "
                        "(--token works too, but others on the machine see it in `ps`)")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = hub_api(token, endpoint)
    url = open_repo(api, repo_id, private, revision)  # a refused token or an unreachable hub fails before any staging
    with tempfile.TemporaryDirectory(prefix=".push-", dir=run.path) as scratch:
        folder = stage(run, what, Path(scratch))
        if what == "adapter" and not base_model_facts(run.read_config().model.name)[0]:
            say(f"push: the adapter's base, {run.read_config().model.name}, is a local folder, not on the Hub: "
                "others can load the adapter only onto a copy of it; --what merged uploads a model that loads alone")
        (folder / "README.md").write_text(model_card(run, what, repo_id), encoding="utf-8")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        say(f"push: {what} of {run.path} to {repo_id} (revision {revision}) at {endpoint}: {len(files)} files, "
            f"{size_text(sum(p.stat().st_size for p in files))}")
        for path in files:
            say(f"  {path.relative_to(folder)}  {size_text(path.stat().st_size)}")
        with hub_errors(repo_id, revision, endpoint):
            api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                              commit_message="Upload from tunesmith push")
    say(f"push: done, {url}")
    return url


def finished_run(path: str | Path) -> RunFolder:
    run = RunFolder(path).require()
    status = run.status()
    if status != "finished":
        raise UserError(f"{run.path}: not a finished run ({status}); push uploads what a finished training left")
    run.trained()  # a run folder without its weights says so here, before a token is asked for
    run.intact_results()  # as does one whose results are damaged (the card shows them)
    return run


def choose_what(run: RunFolder, what: str | None) -> str:
    """'adapter' or 'merged': by default the adapter of an adapter method, the model of a full fine-tune."""
    has_adapter = (run.trained() / "adapter_config.json").exists()
    what = what or ("adapter" if has_adapter else "merged")
    if what not in WHAT:
        raise UserError(f"push: --what {what!r}; choose from {', '.join(WHAT)}")
    if what == "adapter" and not has_adapter:
        raise UserError(f"{run.path}: a full fine-tune has no adapter; push it with --what merged")
    return what


def stage(run: RunFolder, what: str, scratch: Path) -> Path:
    """The folder to upload: the adapter or the merged model as `tunesmith export` writes them; a full
    fine-tune's model folder is already the merged model."""
    from . import export

    trained = run.trained()
    if what == "adapter":
        folder = Path(export(run.path, scratch, formats="peft")["peft"]["folder"])
        point_adapter_at_hub(folder, run)
        return folder
    if (trained / "adapter_config.json").exists():
        return Path(export(run.path, scratch, formats="hf")["merged"]["folder"])
    folder = scratch / trained.name
    shutil.copytree(trained, folder, copy_function=link_or_copy, ignore=shutil.ignore_patterns("README.md", "*.partial"))
    return folder


def point_adapter_at_hub(folder: Path, run: RunFolder) -> None:
    """An adapter trained on `model: default` names the local converted folder as its base; uploaded, it
    names the base's hub id, or nobody else could load it."""
    hub_id, _ = base_model_facts(run.read_config().model.name)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if hub_id and config.get("base_model_name_or_path") != hub_id:
        config["base_model_name_or_path"] = hub_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)
    return target


def hub_api(token: str, endpoint: str):
    from huggingface_hub import HfApi

    from .. import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="tunesmith", library_version=__version__)


def open_repo(api, repo_id: str, private: bool, revision: str) -> str:
    """The repo (created if missing, else kept as it is) and the branch where it is not main; its URL.
    --private to a repo that exists and is public is refused: the hub keeps its visibility."""
    with hub_errors(repo_id, revision, api.endpoint):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if private and not api.repo_info(repo_id).private:
            raise UserError(f"push: {repo_id} exists and is public, and --private does not change an existing "
                            "repo: nothing was uploaded. Make it private on the hub first, or push to another repo")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    return url if revision == "main" else f"{url}/tree/{revision}"


@contextmanager
def hub_errors(repo_id: str, revision: str, endpoint: str):
    """huggingface_hub's exceptions as one-line UserErrors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, OfflineModeIsEnabled

    try:
        yield
    except HFValidationError as err:
        raise UserError(f"push: {repo_id!r} is not a valid repo id (namespace/name): {first_line(err)}") from None
    except HfHubHTTPError as err:
        code = err.response.status_code if err.response is not None else None
        known = {
            401: f"{endpoint} refused the token (401 Unauthorized); check --token, HF_TOKEN or `hf auth login`",
            403: f"the token may not write to {repo_id} (403 Forbidden); use a write token of its namespace",
            404: f"{repo_id} (revision {revision}) not found at {endpoint} (404)",
        }
        raise UserError("push: " + known.get(code, f"{endpoint} answered {code}: "
                                                  f"{err.server_message or first_line(err)}")) from None
    except OfflineModeIsEnabled:
        raise UserError("push: HF_HUB_OFFLINE is set; unset it to upload") from None
    except HTTPError as err:  # the transport's errors: refused, timed out, name not resolved
        raise UserError(f"push: could not reach {endpoint}: {first_line(err)}") from None
    except ValueError as err:  # e.g. the Hub's check of the card's metadata
        raise UserError(f"push: {first_line(err)}") from None


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def size_text(size: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
