"""A recording stand-in for ``huggingface_hub.HfApi``: push code is checked at the HfApi boundary, offline."""

import os


class CommitInfo(str):
    """Like huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with a ``commit_url`` attribute."""

    @property
    def commit_url(self) -> str:
        return str(self)


def fake_hf_api(monkeypatch, commit_url: str = "https://hub/commit/1") -> list[tuple]:
    """Patch ``huggingface_hub.HfApi``; returns the list the calls are recorded in, in order:
    ``("init", token)``, ``("create_repo", repo_id, kwargs)``, ``("create_branch", repo_id, kwargs)``,
    ``("upload_folder", kwargs)`` with ``kwargs["files"]`` = the uploaded folder's listing at upload time."""
    import huggingface_hub

    calls: list[tuple] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", {**kw, "files": sorted(os.listdir(kw["folder_path"]))}))
            return CommitInfo(commit_url)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls
