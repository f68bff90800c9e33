"""DALI loader: one pipeline graph for GPU (mixed decode, GPU ops) and CPU (every op on the CPU).

Train (data.train_crop), at the epoch's size (data.crop_size, or where the data.train_res ramp has got to):
  random_resized  decode a random crop (area data.scale, aspect data.ratio) -> resize to the size
  random          decode -> resize shorter side to train_resize -> random crop of the size
  then colour jitter (data.color_jitter, see :func:`color_jitter`), random horizontal flip (data.hflip),
  normalise with mean/std x 255, cast to the hand-over dtype, HWC layout.
Val: decode -> resize shorter side to val_resize -> centre crop val_crop -> normalise.

The reader is the only thing the layouts change: ``fn.readers.file`` over the ImageFolder listing or
``fn.readers.webdataset`` over ``{split}/*.tar`` shards with their DALI ``.idx`` files (pipelines.pack), both
as pipelines.splits listed and checked them.

Sharding: shard_id = global rank, num_shards = world size, pad_last_batch=True, and the iterator is told
the reader's name, so it knows the shard sizes and removes the padding duplicates. Train shuffles the whole
dataset every epoch (``shuffle_after_epoch``: one permutation per epoch, the same on every rank since the
seed is shared, each rank reading its own slice, so ranks stay disjoint); val reads a fixed slice per rank
(``stick_to_shard``) so every image is counted exactly once across ranks.

A change of training resolution rebuilds the train pipeline at the new size from a DALI checkpoint of the
old one, taken at the batches handed out so far: the reader position and the random generators carry over -
the path a resume takes, so a run resumed across a change is exact. (The size fed as an argument input would
have to run ahead of DALI's prefetch queue and be a second state to checkpoint.) What a rebuild costs:
benchmarks/RESULTS.md, "Training-resolution schedule".

Damaged images: the check at start (pipelines.splits) refuses before the first batch what DALI would decode
silently (a truncated JPEG, on the GPU) or fail on without naming the file (headers it cannot parse, content
that is no image); any other decode failure stops the epoch with a DamagedFiles error naming the file from
DALI's message.
"""
from __future__ import annotations

import base64
import contextlib
import re
from typing import Iterator, Optional

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from fdmobilenet.cli import DataError
from fdmobilenet.config import DataConfig
from pipelines.base import BatchLoader, image_dtype, nchw_channels_last
from pipelines.splits import CheckedSplit, DamagedFiles

READER = "Reader"
OUTPUTS = ["images", "labels"]
_DALI_DTYPE = {torch.float16: types.FLOAT16, torch.float32: types.FLOAT}
_DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (.+)")
MAX_CLASS_DIGITS = 8   # .cls members hold the class index as ASCII digits (pipelines.pack)


# --------------------------------------------------------------------------------------------- the graph
def color_jitter(images, brightness: float, contrast: float, saturation: float, hue: float):
    """torchvision ColorJitter(b, c, s, h) as one ``fn.color_twist``: brightness, contrast and saturation
    factors uniform in [max(0, 1 - x), 1 + x], hue shift uniform in [-h, h] of the colour circle
    (= +-360 h degrees). Differences from torchvision: a fixed order (torchvision permutes the four per
    image) and contrast pivots on mid-grey (128) instead of the image's mean grey."""
    def factor(x):
        return fn.random.uniform(range=[max(0.0, 1.0 - x), 1.0 + x]) if x > 0 else 1.0
    return fn.color_twist(images, brightness=factor(brightness), contrast=factor(contrast),
                          saturation=factor(saturation),
                          hue=fn.random.uniform(range=[-360.0 * hue, 360.0 * hue]) if hue > 0 else 0.0)


def ascii_to_label(cls_bytes):
    """A ``.cls`` member (ASCII digits, e.g. b"417") -> int64 scalar, computed in the graph (no Python
    callback): pad to MAX_CLASS_DIGITS with a non-digit, then Horner's rule over the digit positions."""
    padded = fn.pad(cls_bytes, fill_value=255, shape=[MAX_CLASS_DIGITS], axes=[0])
    value = None
    for i in range(MAX_CLASS_DIGITS):
        byte = fn.cast(padded[i], dtype=types.INT64)
        is_digit = fn.cast((byte >= 48) & (byte <= 57), dtype=types.INT64)
        # a digit d: value = 10 * value + d; anything else leaves value as it is
        value = is_digit * (byte - 48) if value is None else value + is_digit * (value * 9 + byte - 48)
    return value


@pipeline_def
def image_pipeline(data: DataConfig, train: bool, device: str, shard_id: int, num_shards: int,
                   out_dtype, shuffle_seed: int, size: int, files: Optional[list[str]] = None,
                   labels: Optional[list[int]] = None, tars: Optional[list[str]] = None,
                   indices: Optional[list[str]] = None):
    """The train or val graph; ``device`` is 'gpu' (mixed decode, GPU ops) or 'cpu'; ``size``: the train
    crop's (val crops data.val_crop). The reader reads ``files``/``labels`` (ImageFolder) or
    ``tars``/``indices`` (webdataset); nothing else differs."""
    shard = dict(name=READER, shard_id=shard_id, num_shards=num_shards, pad_last_batch=True,
                 dont_use_mmap=data.dont_use_mmap)
    if train:
        shard.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed)
    else:
        shard.update(stick_to_shard=True)
    if tars is None:
        jpegs, label = fn.readers.file(files=files, labels=labels, **shard)
        label = fn.cast(label, dtype=types.INT64)
    else:
        # webdataset's shuffle_after_epoch permutes whole tars; the buffer shuffle mixes within them
        jpegs, cls = fn.readers.webdataset(paths=tars, index_paths=indices, ext=["jpg", "cls"],
                                           missing_component_behavior="error", random_shuffle=train,
                                           **shard)
        label = ascii_to_label(cls)

    decode = dict(device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    if device == "gpu":
        decode.update(hw_decoder_load=data.hw_decoder_load,
                      preallocate_width_hint=data.preallocate_width_hint,
                      preallocate_height_hint=data.preallocate_height_hint)
    crop = {}
    if train and data.train_crop == "random_resized":
        images = fn.resize(random_crop_decode(jpegs, data, decode), resize_x=size, resize_y=size)
    elif train:
        images = fn.resize(fn.decoders.image(jpegs, **decode), resize_shorter=data.train_resize)
        crop = dict(crop=(size, size), crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                    crop_pos_y=fn.random.uniform(range=[0.0, 1.0]))
    else:
        images = fn.resize(fn.decoders.image(jpegs, **decode), resize_shorter=data.val_resize)
        crop = dict(crop=(data.val_crop, data.val_crop))          # centred: crop_pos defaults to 0.5
    if train and data.color_jitter:
        images = color_jitter(images, *data.color_jitter)
    images = normalise(images, data, out_dtype, mirror=train and data.hflip, **crop)
    return images, (label.gpu() if device == "gpu" else label)


def random_crop_decode(jpegs, data: DataConfig, decode: dict):
    """RandomResizedCrop's window (area data.scale, aspect data.ratio), decoded alone (DALI's ROI decode)."""
    return fn.decoders.image_random_crop(jpegs, random_area=list(data.scale), random_aspect_ratio=list(data.ratio),
                                         **decode)


def normalise(images, data: DataConfig, out_dtype, mirror: bool, **crop):
    """Crop (when given), flip at random when ``mirror``, (x - mean) / std in ``out_dtype``, HWC."""
    return fn.crop_mirror_normalize(
        images, dtype=out_dtype, output_layout="HWC",
        mean=[255.0 * m for m in data.mean], std=[255.0 * s for s in data.std],
        mirror=fn.random.coin_flip(probability=0.5) if mirror else 0, **crop)


def hand_over_on_current_stream(pipe, device: torch.device) -> None:
    """Let the GPU, not the host, wait for each batch.

    DALIGenericIterator takes every batch with ``pipe.share_outputs()`` and no stream
    (nvidia/dali/plugin/base_iterator.py, ``_get_outputs``), which DALI documents as "the outputs are
    synchronized with the host" (nvidia/dali/pipeline.py, ``share_outputs``): the host blocks on every batch
    until DALI's GPU work for it has finished, and cannot queue the next training step meanwhile. With DALI's
    default (dynamic) executor ``share_outputs(cuda_stream=s)`` binds the outputs to stream ``s`` instead:
    ``s`` waits for DALI's work on the GPU, and the buffers go back to DALI's pool in ``s``'s order when torch
    frees them. ``s`` is torch's current stream when the batch is taken - the stream the training step and
    the evaluation run on (DALI's own torchvision wrapper binds to it the same way,
    nvidia/dali/experimental/torchvision/v2/compose.py). The iterator then wraps the buffers with
    ``torch.from_dlpack`` on that same stream, and its ``release_outputs()`` leaves them valid under the
    dynamic executor (they are reference counted), so nothing else in the iterator changes."""
    share = pipe.share_outputs

    def share_on_current_stream(cuda_stream=None):
        return share(cuda_stream=cuda_stream if cuda_stream is not None else torch.cuda.current_stream(device))
    pipe.share_outputs = share_on_current_stream


# ---------------------------------------------------------------------------------------------- loader
class DaliLoader(BatchLoader):
    """DALI pipeline + DALIGenericIterator behind the BatchLoader interface.

    Train yields ``len(self)`` full batches per epoch on every rank (the smallest rank's full batches;
    the few images past them are read and dropped, different ones each epoch). Val yields every image of
    this rank's slice once; its last batch may be smaller.

    DALI's epoch is not the trainer's: a train epoch left early (a steps_per_epoch cap) is continued by the
    next ``iter()``, so no decoded batch is wasted and the reader state is one position in DALI's stream.
    The pipeline is built at the first ``iter()``: at a new epoch, from a restored state, or from the
    position where a change of training resolution left the previous pipeline.
    """

    def __init__(self, data: DataConfig, split: CheckedSplit, batch_size: int, *, rank: int, world_size: int,
                 local_rank: int, device: torch.device):
        super().__init__(data, split.name, split.total, batch_size, rank, world_size, device,
                         where=f"{split.folder} ({data.layout})")
        if not self.train and self.num_samples == 0:
            raise DataError(f"{split.folder}: {split.total} validation images for {world_size} ranks leaves rank "
                            f"{rank} none; use fewer ranks")
        self.data, self.split, self.rank, self.world_size = data, split, rank, world_size
        self.device_id = (device.index if device.index is not None else local_rank) \
            if device.type == "cuda" else None
        self.dtype = image_dtype(data, device)
        # The reader's position, all of it:
        self._iterator: Optional[DALIGenericIterator] = None   # None until the next iter() builds it: before
        #   the first epoch, after a restore or a change of size, after a decode error or a val pass left early
        self._checkpoint: Optional[bytes] = None   # the DALI checkpoint that build starts from (None: a new epoch)
        self._steps_done = 0                  # batches handed out of the DALI epoch in progress
        self._shuffle_seed = data.seed        # of the train shuffle: data.seed + the first set_epoch's epoch,
        #   or the restored state's

    def set_epoch(self, epoch: int) -> None:
        size = self.image_size
        super().set_epoch(epoch)
        if self._iterator is None and self._checkpoint is None:
            # DALI reshuffles by itself after each of its epochs; before the first build the epoch picks the
            # seed (see pipelines.base on what set_epoch guarantees)
            self._shuffle_seed = self.data.seed + epoch
        elif self._iterator is not None and self.image_size != size:
            self._checkpoint, self._iterator = self._dali_checkpoint(), None   # next iter(): rebuilt at the size

    # ---------------------------------------------------------------------------------------- building
    def _build(self) -> DALIGenericIterator:
        """The pipeline and its iterator at ``image_size``: a new epoch, or the position ``_checkpoint`` holds."""
        checkpoint, self._checkpoint = self._checkpoint, None
        pipe = image_pipeline(
            data=self.data, train=self.train, device="gpu" if self.device_id is not None else "cpu",
            shard_id=self.rank, num_shards=self.world_size, out_dtype=_DALI_DTYPE[self.dtype],
            shuffle_seed=self._shuffle_seed, size=self.image_size, **self.split.reader,
            batch_size=self.batch_size, num_threads=max(1, self.data.num_threads), device_id=self.device_id,
            seed=self.data.seed + self.rank,         # augmentation differs per rank; the shuffle does not
            prefetch_queue_depth=self.data.prefetch_queue_depth,
            enable_checkpointing=self.train, checkpoint=checkpoint)
        with self._naming_bad_files():
            pipe.build()
            if self.device_id is not None and pipe.exec_dynamic:
                hand_over_on_current_stream(pipe, self.device)
            return DALIGenericIterator([pipe], OUTPUTS, reader_name=READER, auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.PARTIAL)

    @contextlib.contextmanager
    def _naming_bad_files(self):
        """Turn DALI's decode failure into a DamagedFiles error that names the file (DALI reports the path
        it read the sample from); any DALI error leaves the pipeline unusable, so it is dropped."""
        try:
            yield
        except RuntimeError as exc:
            self._iterator, self._checkpoint, self._steps_done = None, None, 0
            folder = self.split.folder
            match = _DECODE_FAILURE.search(str(exc))
            if match is None and "decoders." in str(exc):
                raise DamagedFiles(f"DALI's decoder failed on a file of {folder} without naming it",
                                   f"the start-up check (JPEG headers and ends) found none damaged. `python -m "
                                   f"pipelines.verify {folder}` decodes every file and names it. DALI said: {exc}"
                                   ) from exc
            if match is None:
                raise
            fix = ("the key is the sample's position in the packed ImageFolder; check that folder with "
                   "`python -m pipelines.verify`, fix it and pack again"
                   if self.data.layout == "webdataset" else "")    # DALI names it TAR:OFFSET:KEY.jpg
            raise DamagedFiles.undecodable(match.group(1).strip(), "truncated or corrupt image", folder, fix) from exc

    # --------------------------------------------------------------------------------------- iterating
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is not None and not self.train and self._steps_done:
            self._iterator = None               # a val pass was left early: start a fresh, whole one
        if self._iterator is None:
            self._iterator = self._build()
        if self.train and self._steps_done >= len(self):
            for _ in self._dali_batches():      # the last epoch's dropped tail was never read: read it now
                pass
        for batch in self._dali_batches():
            if self.train and self._steps_done >= len(self):
                continue                        # past the common step count: read to the epoch end, drop
            self._steps_done += 1
            yield self.to_batch(batch)

    def _dali_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the DALI epoch, without all-padding batches; at its end the count starts again."""
        while True:
            with self._naming_bad_files():
                try:
                    batch = next(self._iterator)[0]
                except StopIteration:
                    break
            if batch["images"].shape[0] > 0:    # 0: this rank's slice ended a batch before the longest one's
                yield batch
        self._steps_done = 0

    @staticmethod
    def to_batch(dali_out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """DALIGenericIterator's NHWC images / (N, 1) labels -> NCHW channels_last images / (N,) labels,
        both views of the iterator's tensors (no copy)."""
        return nchw_channels_last(dali_out["images"]), dali_out["labels"].view(-1)

    # ------------------------------------------------------------------------------------------- state
    def _dali_checkpoint(self) -> bytes:
        """DALI's checkpoint of the pipeline, at the batches handed out (not those prefetched)."""
        checkpoint = self._iterator.checkpoints()[0]
        return checkpoint.encode("latin-1") if isinstance(checkpoint, str) else checkpoint

    def state_dict(self) -> dict:
        """Train: the DALI reader/RNG checkpoint (where the next batch comes from) with the shuffle seed and
        the batches done of DALI's epoch; ``{}`` for val, and before the first batch."""
        if not self.train or (self._iterator is None and self._checkpoint is None):
            return {}
        checkpoint = self._dali_checkpoint() if self._iterator is not None else self._checkpoint
        # base64 text: loads under torch.load(weights_only=True)
        return {"dali": base64.b64encode(checkpoint).decode("ascii"), "shuffle_seed": self._shuffle_seed,
                "steps_done": self._steps_done}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next ``iter()`` builds the pipeline at that position and continues
        there (mid-epoch: the remaining ``len(self) - state['steps_done']`` batches of it)."""
        if not state:
            return
        missing = {"dali", "shuffle_seed", "steps_done"} - set(state)
        if missing or not self.train:
            raise ValueError(f"DALI {self.split.name} loader state needs keys dali, shuffle_seed, steps_done; got "
                             f"{sorted(state)}")
        self._shuffle_seed, self._steps_done = state["shuffle_seed"], state["steps_done"]
        self._iterator, self._checkpoint = None, base64.b64decode(state["dali"])
