"""Loading an hfx pipeline by local folder or Hub repo id, with errors that say what failed: one mixin that
every hfx pipeline class puts before ``DiffusionPipeline`` in its bases."""

from __future__ import annotations

import os

from diffusers import DiffusionPipeline


def _hub_error_reason(error: BaseException, revision: str | None) -> str | None:
    """Why diffusers' download failed, in words, from the first known error in the chain it raised; None when
    no Hub or network error is in the chain (a full disk, say)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub uses, as it exports it

    # Most specific first: a LocalEntryNotFoundError is also an EntryNotFoundError, OfflineModeIsEnabled a
    # ConnectionError. diffusers wraps the Hub's own error (its `__cause__`) in an OSError of its own.
    reasons = [
        (RepositoryNotFoundError, "no such repository on the Hub (or it is private or gated and the token does not "
                                  "give access)"),
        (RevisionNotFoundError, f"the repository has no revision {revision!r}"),
        (OfflineModeIsEnabled, "it is not in the local cache and the Hub is offline (HF_HUB_OFFLINE=1)"),
        ((httpx.TransportError, ConnectionError), "it is not in the local cache and the Hub cannot be reached"),
        (LocalEntryNotFoundError, "it is not (fully) in the local cache and downloads are off (local_files_only=True)"),
        (EntryNotFoundError, "a file a pipeline needs (model_index.json, a component's files) is not in the "
                             "repository: is it a folder saved by save_pretrained?"),
        (HFValidationError, "it is neither a local folder nor a valid Hub repo id"),
        (HfHubHTTPError, "the Hub answered with an error"),
    ]
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for kinds, reason in reasons:
        if any(isinstance(link, kinds) for link in chain):
            return reason
    return None


class FolderOrRepoLoading:
    """``from_pretrained`` and ``download`` of an hfx pipeline (``class P(FolderOrRepoLoading, DiffusionPipeline)``):
    a local folder must hold ``model_index.json``; a repo id goes through diffusers' downloader, and a failure
    names the repo and the reason on its first line."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
        """Load from a local folder written by ``save_pretrained`` or from a Hub repo id.

        A repo id goes through diffusers' own downloader (:meth:`download`); ``revision``, ``cache_dir``,
        ``token``, ``force_download`` and ``local_files_only`` apply to it. Other keyword arguments
        (``torch_dtype``, component overrides such as ``scheduler=...``) go to diffusers' loader.

        Raises:
            FileNotFoundError: a missing local folder, a folder without ``model_index.json``, or a repo id that
                cannot be loaded (not on the Hub, not cached while offline or unreachable); the first line of the
                message names the folder or repo id and says why.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
                raise FileNotFoundError(f"no pipeline folder at {path!r} (and it is not a Hub repo id)")
        elif not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path!r} has no model_index.json: not a folder written by save_pretrained")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str | os.PathLike:
        """diffusers' :meth:`DiffusionPipeline.download`, with errors that say which repo failed and why.

        Raises:
            FileNotFoundError: the repo cannot be downloaded or found in the cache. The first line names the repo
                id (and revision) and the reason; the Hub's own error is chained as the cause.
        """
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError
        from huggingface_hub.utils import httpx

        try:
            return super().download(pretrained_model_name, **kwargs)
        except (OSError, EntryNotFoundError, HFValidationError, httpx.HTTPError) as err:
            revision = kwargs.get("revision")
            reason = _hub_error_reason(err, revision)
            if reason is None:
                raise
            at = f" at revision {revision!r}" if revision else ""
            raise FileNotFoundError(
                f"cannot load pipeline {pretrained_model_name!r}{at}: {reason}\n({type(err).__name__}: {err})"
            ) from err
