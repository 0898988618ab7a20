"""Which prompts each process renders: rank-aware samplers for the two trainers (spec §6.4, §7.8).

Both samplers draw one *global* multiset of prompt indices from a generator seeded identically on
every rank (`seed + epoch` or `seed + counter`, seed = config.seed = 42), so ranks agree without
communicating: pick `n` distinct prompts by a random permutation, repeat each `r` times, shuffle the
repeated list with the same generator. Each rank then takes its own part of that list:

    EpochPromptSampler   default trainer, one epoch = num_prompt_per_epoch prompts x num_image_per_prompt
                         images, cut into batches of sample.train_batch_size; global batch b goes to
                         rank b mod P (the assignment accelerate's loader wrapper makes upstream), done
                         here explicitly so every rank gets exactly len(sampler) batches for any P.
    BranchPromptSampler  branch trainer, infinite; every draw is P x collection_batch_size images of
                         P x B / image_per_prompt prompts; rank r takes positions [r B, (r + 1) B).
                         A prompt's copies are spread across ranks, so a "prompt" group spans processes
                         while a "seed" group lives inside one rollout on one process.

Both hold only integer state (`epoch` / `counter`), saved by `state_dict()` for resume. Use them as a
DataLoader `batch_sampler` with num_workers = 0 (the trainer changes their state between draws).
"""
from __future__ import annotations

from typing import Iterator, List

import torch

__all__ = ["draw_prompt_multiset", "EpochPromptSampler", "BranchPromptSampler", "branch_counter"]

PROMPT_SEED = 42  # config.seed; upstream seeds prompt selection with seed + epoch (or + counter)


def draw_prompt_multiset(num_prompts: int, num_distinct: int, repeats: int, seed: int) -> List[int]:
    """`num_distinct` distinct indices of range(num_prompts), each `repeats` times, in shuffled order.

    Deterministic in `seed`; the generator is consumed as upstream does (selection permutation first,
    then the shuffle of the repeated list), so the same seed picks the same prompts as upstream.
    """
    if not 0 < num_distinct <= num_prompts:
        raise ValueError(f"need 0 < prompts per draw <= dataset size, got {num_distinct} of {num_prompts}")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(num_prompts, generator=gen)[:num_distinct]  # [num_distinct]
    repeated = chosen.repeat_interleave(repeats)  # [num_distinct * repeats], copies adjacent
    order = torch.randperm(repeated.numel(), generator=gen)
    return repeated[order].tolist()


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")


class EpochPromptSampler:
    """Default-trainer batch sampler: this rank's batches of one epoch (call `set_epoch` before each)."""

    def __init__(self, num_prompts: int, batch_size: int, image_per_prompt: int, prompt_per_epoch: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = PROMPT_SEED):
        _check_rank(num_replicas, rank)
        total = image_per_prompt * prompt_per_epoch
        if total % (batch_size * num_replicas) != 0:
            raise ValueError(
                f"sample.num_prompt_per_epoch x sample.num_image_per_prompt = {total} images must split into "
                f"batches of sample.train_batch_size={batch_size} on each of {num_replicas} processes")
        if prompt_per_epoch > num_prompts:
            raise ValueError(f"sample.num_prompt_per_epoch={prompt_per_epoch} exceeds the {num_prompts} prompts")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.image_per_prompt = image_per_prompt
        self.prompt_per_epoch = prompt_per_epoch
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.global_batches = total // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """This rank's batches of `epoch`: global batches rank, rank + P, rank + 2P, ..."""
        order = draw_prompt_multiset(self.num_prompts, self.prompt_per_epoch, self.image_per_prompt,
                                     self.seed + epoch)
        bs = self.batch_size
        return [order[b * bs:(b + 1) * bs] for b in range(self.rank, self.global_batches, self.num_replicas)]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        return self.global_batches // self.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


def branch_counter(epoch: int, rollout: int, rollouts_per_epoch: int) -> int:
    """The draw counter the branch trainer uses: epoch x num_batches_per_epoch + rollout index."""
    return epoch * rollouts_per_epoch + rollout


class BranchPromptSampler:
    """Branch-trainer batch sampler (infinite): this rank's `batch_size` indices of draw `counter`.

    Iterating yields the batch of the current `counter` and then advances it by one, so a run that never
    calls `set_counter` still follows epoch x num_batches_per_epoch + rollout, and `state_dict()` always
    names the next draw.
    """

    def __init__(self, num_prompts: int, batch_size: int, image_per_prompt: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = PROMPT_SEED):
        _check_rank(num_replicas, rank)
        images = num_replicas * batch_size
        if images % image_per_prompt != 0:
            raise ValueError(
                f"sample.num_image_per_prompt={image_per_prompt} must divide processes x "
                f"sample.collection_batch_size = {num_replicas} x {batch_size}")
        self.prompts_per_draw = images // image_per_prompt  # 4 for the paper run: 4 GPUs x 4 / 4
        if self.prompts_per_draw > num_prompts:
            raise ValueError(f"a draw needs {self.prompts_per_draw} prompts but the dataset has {num_prompts}")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.image_per_prompt = image_per_prompt
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.counter = 0

    def set_counter(self, counter: int) -> None:
        self.counter = int(counter)

    def global_draw(self, counter: int) -> List[int]:
        """All P x batch_size indices of draw `counter`, identical on every rank."""
        return draw_prompt_multiset(self.num_prompts, self.prompts_per_draw, self.image_per_prompt,
                                    self.seed + counter)

    def batch_for(self, counter: int) -> List[int]:
        """This rank's slice [rank B, (rank + 1) B) of draw `counter`."""
        start = self.rank * self.batch_size
        return self.global_draw(counter)[start:start + self.batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            batch = self.batch_for(self.counter)
            self.counter += 1
            yield batch

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
