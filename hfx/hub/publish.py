"""Publish an output folder to the Hugging Face Hub (or the endpoint in ``HF_ENDPOINT``) in one commit.

What is uploaded (see :mod:`hfx.hub.artifact` for what an output folder is): the artifact that
``from_pretrained`` loads (the run's ``final/``, or the bare artifact folder), its model card
``README.md`` (rendered first when missing) and the images the card references. Never uploaded unless
asked: ``checkpoint-*`` folders (``include_checkpoints=True`` adds them), TensorBoard logs, optimizer,
scaler and RNG state. With ``remote_code=True`` the remote-code export (:mod:`hfx.hub.export`) is pushed
instead, so people without hfx can load the repo with ``trust_remote_code=True``.

All files go in ONE ``create_commit``: a failure at any point leaves the repo as it was (the Hub moves the
branch only when the whole commit is accepted). Transient failures (HTTP 429/5xx, dropped connections)
are retried with exponential backoff; the commit is pinned to the branch head it was built on
(``parent_commit``), so a retry after a lost response cannot commit twice. The token is taken from the
``token`` argument, ``HF_TOKEN`` or the login cache, and never printed, logged or written: every error
message is scrubbed of it.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path

from hfx.hub.artifact import Output, artifact_files, resolve_output
from hfx.hub.cards import MARKER, card_images, render_card

logger = logging.getLogger(__name__)

#: First wait between attempts, doubled after each failure (tests lower it).
RETRY_BASE_SECONDS = 1.0
TRANSIENT_STATUS = (429, 500, 502, 503, 504)


class HubAuthError(PermissionError):
    """The endpoint rejected the token (HTTP 401) or refused the write (HTTP 403)."""


class HubUnreachableError(ConnectionError):
    """The endpoint could not be reached, or kept failing after every retry."""


def push(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include_checkpoints: bool = False,
    remote_code: bool = False,
    max_retries: int = 4,
) -> str:
    """Upload an output folder to the Hub repo ``repo_id`` (created if needed) in a single commit.

    Args:
        output_dir: a run folder (with ``final/``) or a folder written by ``save_pretrained``.
        repo_id: ``"user/name"`` or ``"org/name"``.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from ``main`` when missing); default ``main``.
        commit_message: default ``"Upload <kind> with hfx"``.
        token: a Hub token; default ``HF_TOKEN`` or the stored login.
        include_checkpoints: also upload the run's ``checkpoint-*`` folders (training state, large).
        remote_code: push the remote-code export (loads without hfx, ``trust_remote_code=True``).
        max_retries: retries of each Hub call on transient failures.

    An hfx-rendered card (or a missing one) is rendered again for the upload, so its load snippet names
    ``repo_id``; a card whose marker line was deleted is uploaded as it is.

    Returns:
        The URL of the commit.

    Raises:
        FileNotFoundError: no output folder, no artifact in it, or an image the card references is missing.
        ValueError: an invalid ``repo_id`` or ``revision``.
        HubAuthError: the token was rejected, or it may not write to ``repo_id``.
        HubUnreachableError: the endpoint cannot be reached or keeps failing.
    """
    _check_target(repo_id, revision)
    output = resolve_output(output_dir)
    _check_online()
    with tempfile.TemporaryDirectory(prefix="hfx-push-") as tmp:
        folder = output.artifact_dir
        if remote_code:
            from hfx.hub.export import export_remote_code

            folder = export_remote_code(output_dir, Path(tmp) / "export")
        card_dir = folder
        readme = folder / "README.md"
        if not readme.is_file() and not remote_code:
            logger.info("%s has no model card: rendering one", folder)
            render_card(output_dir)  # kept with the artifact (and its sample grid is made only once)
        if not readme.is_file() or MARKER in readme.read_text(encoding="utf-8"):
            # An hfx card is rendered again so that its load snippet names this repo.
            card_dir = render_card(output_dir, out_dir=Path(tmp) / "card", repo_id=repo_id, remote_code=remote_code).parent
        operations = _operations(output, folder, card_dir, include_checkpoints)
        kind = "remote-code " + output.kind if remote_code else output.kind
        message = commit_message or f"Upload {kind} with hfx"
        return _commit(operations, repo_id, folder, private=private, revision=revision, message=message, token=token,
                       max_retries=max_retries)


def push_files(
    files: dict[str, str | Path],
    repo_id: str,
    *,
    repo_type: str = "model",
    space_sdk: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    token: str | None = None,
    max_retries: int = 4,
) -> str:
    """Upload ``files`` (path in the repo -> local file) to ``repo_id`` (created if needed) in ONE commit, with
    :func:`push`'s checks, retries and error messages. ``repo_type="space"`` with ``space_sdk="gradio"`` publishes
    a Space (``hfx space --push``). Returns the URL of the commit."""
    from huggingface_hub import CommitOperationAdd

    _check_target(repo_id, revision)
    _check_online()
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(source)) for path, source in sorted(files.items())]
    return _commit(operations, repo_id, f"{len(files)} files", repo_type=repo_type, space_sdk=space_sdk, private=private,
                   revision=revision, message=commit_message, token=token, max_retries=max_retries)


def _check_target(repo_id: str, revision: str | None) -> None:
    """A ValueError naming a ``repo_id`` or ``revision`` (branch) the Hub would refuse."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid repo id {repo_id!r}: {str(err).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise ValueError(f"invalid repo id {repo_id!r}: expected 'user/name' or 'org/name'")
    if revision is not None and (not revision or revision != revision.strip() or ".." in revision):
        raise ValueError(f"invalid revision (branch name) {revision!r}")


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubUnreachableError("offline mode is on (HF_HUB_OFFLINE=1): pushing needs the Hub; unset HF_HUB_OFFLINE")


def _commit(operations: list, repo_id: str, source, *, repo_type: str = "model", space_sdk: str | None = None,
            private: bool, revision: str | None, message: str, token: str | None, max_retries: int) -> str:
    """Create the repo if needed, then commit ``operations`` to ``revision`` (default main) pinned to the branch
    head it was built on; transient failures retried. Returns the commit URL."""
    from huggingface_hub import HfApi, constants, get_token

    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    call = _Caller(endpoint, repo_id, token or get_token(), max_retries)
    call("create the repo", lambda: api.create_repo(repo_id, repo_type=repo_type, space_sdk=space_sdk, private=private,
                                                    exist_ok=True))
    branch = revision or "main"
    if branch != "main":
        call(f"create branch {branch!r}", lambda: api.create_branch(repo_id, repo_type=repo_type, branch=branch,
                                                                     exist_ok=True))
    head = call("read the branch head", lambda: api.repo_info(repo_id, repo_type=repo_type, revision=branch).sha)
    logger.info("pushing %d files from %s to %s@%s", len(operations), source, repo_id, branch)
    info = call("commit", lambda: api.create_commit(
        repo_id, operations, repo_type=repo_type, commit_message=message, revision=branch, parent_commit=head),
        landed=lambda: _landed(api, repo_id, branch, head, repo_type))
    return info if isinstance(info, str) else info.commit_url


def _operations(output: Output, folder: Path, card_dir: Path, include_checkpoints: bool) -> list:
    """One ``CommitOperationAdd`` per uploaded file: the artifact in ``folder``, the card and its images
    from ``card_dir``, and checkpoints when asked. Every image the card shows must be uploaded."""
    from huggingface_hub import CommitOperationAdd

    files = {path: folder / path for path in artifact_files(folder)}
    if card_dir != folder:
        files = {path: source for path, source in files.items() if path != "README.md" and not path.startswith("images/")}
        files.update({path: card_dir / path for path in artifact_files(card_dir)})
    readme = card_dir / "README.md"
    for image in card_images(readme.read_text(encoding="utf-8")):
        if image in files:
            continue
        # A hand-written card may show images from the run folder (samples/), beside the artifact.
        source = output.run_dir / image if output.run_dir is not None else None
        if source is None or not source.is_file():
            raise FileNotFoundError(f"the model card {readme} shows {image!r}, which is neither in {folder} "
                                    "nor in the run folder: fix the card or re-render it with `hfx card`")
        files[image] = source
    if include_checkpoints and output.run_dir is not None:
        for checkpoint in sorted(output.run_dir.glob("checkpoint-*")):
            for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
                files[path.relative_to(output.run_dir).as_posix()] = path
    return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(source)) for path, source in sorted(files.items())]


def _landed(api, repo_id: str, branch: str, head: str, repo_type: str = "model") -> str | None:
    """After a commit attempt whose answer was lost and whose retry found the branch moved: the URL of
    the commit now at the head (taken to be ours: pushes to one branch are expected to come one at a
    time), or ``None`` when the branch did not move."""
    sha = api.repo_info(repo_id, repo_type=repo_type, revision=branch).sha
    where = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
    return None if sha == head else f"{api.endpoint}/{where}/commit/{sha}"


def _http_cause(err: BaseException):
    """The HfHubHTTPError or transport error behind ``err`` (following ``__cause__``), or None."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (HfHubHTTPError, httpx2.TransportError)):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class _Caller:
    """Runs one Hub call with retries on transient failures and turns failures into clear errors."""

    def __init__(self, endpoint: str, repo_id: str, secret: str | None, max_retries: int):
        self.endpoint, self.repo_id, self.secret, self.max_retries = endpoint, repo_id, secret, max_retries

    def __call__(self, what: str, fn, landed=None):
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        failed_before = False
        for attempt in range(self.max_retries + 1):
            try:
                try:
                    return fn()
                except RuntimeError as wrapped:  # huggingface_hub wraps LFS upload errors
                    cause = _http_cause(wrapped)
                    if cause is None:
                        raise
                    raise cause from None
            except HfHubHTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status == 412 and failed_before and landed is not None and (url := landed()):
                    logger.warning("the earlier %s attempt reached the Hub before its answer was lost", what)
                    return url
                if status not in TRANSIENT_STATUS or attempt == self.max_retries:
                    raise self._error(what, err, status) from None
                reason = f"HTTP {status}"
            except (httpx2.TransportError, ConnectionError, TimeoutError) as err:
                if attempt == self.max_retries:
                    raise HubUnreachableError(self._scrub(
                        f"cannot reach the Hub at {self.endpoint} (HF_ENDPOINT) to {what} for {self.repo_id!r} after "
                        f"{attempt + 1} attempts: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    )) from None
                reason = type(err).__name__
            failed_before = True
            wait = RETRY_BASE_SECONDS * 2 ** attempt
            logger.warning("could not %s (%s); retrying in %.1f s (%d/%d)", what, reason, wait, attempt + 1,
                           self.max_retries)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _error(self, what: str, err, status: int | None) -> Exception:
        server_says = getattr(err, "server_message", None) or ""
        detail = f": {server_says.strip().splitlines()[0]}" if server_says.strip() else ""
        if status == 401 and not self.secret:
            return HubAuthError(f"the Hub at {self.endpoint} needs a token to {what} for {self.repo_id!r} and none was "
                                "found: set HF_TOKEN or run `hf auth login` with a write token")
        if status == 401:
            return HubAuthError(self._scrub(
                f"the Hub at {self.endpoint} rejected the token (HTTP 401) when trying to {what} for "
                f"{self.repo_id!r}{detail}; set HF_TOKEN or run `hf auth login` with a write token"))
        if status == 403:
            return HubAuthError(self._scrub(
                f"the token may not {what} for {self.repo_id!r} on {self.endpoint} (HTTP 403){detail}"))
        if status in TRANSIENT_STATUS:
            return HubUnreachableError(self._scrub(
                f"the Hub at {self.endpoint} kept failing to {what} for {self.repo_id!r} (HTTP {status}) after "
                f"{self.max_retries + 1} attempts; nothing was committed"))
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ValueError(self._scrub(f"could not {what} for {self.repo_id!r} on {self.endpoint}: {first}{detail}"))

    def _scrub(self, message: str) -> str:
        if self.secret:
            message = message.replace(self.secret, "***")
        return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", message)
