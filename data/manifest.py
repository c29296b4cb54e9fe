"""`manifest.json`: what a prepared dataset holds, written last and atomically by `prepare`.

A directory without a manifest is not a dataset (an interrupted prepare leaves none). The
fingerprint is the sha256 of the manifest's other content, so it changes whenever any shard,
the tokenizer, seq_len or the sources change; loader states carry it to refuse resuming on other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields

from titans_train.data.errors import ManifestError, SeqLenMismatchError, TokenizerMismatchError
from titans_train.data.shards import SampleLayout, ShardInfo

MANIFEST_NAME = "manifest.json"
FORMAT = "titans-train-tokens/1"


@dataclass
class Manifest:
    tokenizer: dict  # name, sha256, vocab_size, eos_id, spec
    seq_len: int
    dtype: str
    shards: list[dict]  # ShardInfo.as_dict() each
    sources: list[dict]  # path, bytes
    num_documents: int
    num_tokens: int  # tokens in the joined stream (EOS included), before cutting into samples
    text_bytes: int  # UTF-8 bytes of the documents
    shuffle_seed: int
    text_field: str = "text"
    format: str = FORMAT
    member_bytes: int = 0
    fingerprint: str = field(default="")

    @property
    def num_samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    @property
    def layout(self) -> SampleLayout:
        return SampleLayout(self.seq_len, self.dtype)

    def shard_infos(self) -> list[ShardInfo]:
        return [ShardInfo(**shard) for shard in self.shards]

    def as_dict(self) -> dict:
        # Shallow: the fields hold JSON data already (dataclasses.asdict deep-copies, seconds at 10^5 shards).
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def compute_fingerprint(self) -> str:
        content = self.as_dict()
        content.pop("fingerprint")
        content["tokenizer"] = {k: v for k, v in self.tokenizer.items() if k != "spec"}
        content["sources"] = [{k: v for k, v in s.items() if k != "path"} | {"name": os.path.basename(s["path"])} for s in self.sources]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def finalize(self) -> "Manifest":
        self.member_bytes = self.layout.member_bytes
        self.fingerprint = self.compute_fingerprint()
        return self


def _manifest_json(manifest: Manifest) -> str:
    """One top-level key per line and one line per element of a list (shards, sources): readable,
    and written by json's C encoder (an indented dump is pure Python: seconds at 10^5 shards)."""
    items = []
    for key, value in sorted(manifest.as_dict().items()):
        if isinstance(value, list) and value:
            elements = ",\n  ".join(json.dumps(element, sort_keys=True) for element in value)
            items.append(f" {json.dumps(key)}: [\n  {elements}\n ]")
        else:
            items.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_manifest(directory: str, manifest: Manifest) -> str:
    path = os.path.join(directory, MANIFEST_NAME)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(_manifest_json(manifest))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_manifest(directory: str) -> Manifest:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        raise ManifestError(
            f"{path} does not exist: {directory} is not a prepared dataset (or its prepare was "
            "interrupted); run `titans-train data prepare` on the corpus into that directory"
        )
    try:
        with open(path) as handle:
            content = json.load(handle)
        manifest = Manifest(**content)
    except (json.JSONDecodeError, TypeError) as error:
        raise ManifestError(f"{path} is not a valid manifest ({error}); prepare the dataset again") from None
    if manifest.format != FORMAT:
        raise ManifestError(f"{path} has format {manifest.format!r}, this loader reads {FORMAT!r}; prepare again")
    if manifest.fingerprint != manifest.compute_fingerprint():
        raise ManifestError(f"{path} was edited after prepare (fingerprint mismatch); prepare the dataset again")
    if manifest.member_bytes != manifest.layout.member_bytes:
        raise ManifestError(f"{path}: sample layout differs from this version's; prepare the dataset again")
    return manifest


def check_compatible(manifest: Manifest, directory: str, tokenizer=None, seq_len: int | None = None) -> None:
    """Refuse a dataset prepared with another tokenizer or sample length than the run uses."""
    path = os.path.join(directory, MANIFEST_NAME)
    if tokenizer is not None:
        have = manifest.tokenizer
        want = tokenizer.identity
        if have["sha256"] != want.sha256:
            raise TokenizerMismatchError(
                f"{path} was tokenized with {have['name']} (sha256 {have['sha256'][:12]}) but the run "
                f"uses {want}; set the run's data tokenizer to {have.get('spec', have['name'])!r} or "
                f"prepare the corpus again with the run's tokenizer"
            )
    if seq_len is not None and manifest.seq_len != seq_len:
        raise SeqLenMismatchError(
            f"{path} holds samples of seq_len {manifest.seq_len} but the run uses seq_len {seq_len}; "
            f"set the run's seq_len to {manifest.seq_len} or prepare the corpus again with --seq-len {seq_len}"
        )
