"""InfoNCE with gradient caching (GradCache): large contrastive batches in constant memory.

In-batch negatives tie every row's loss to every other row's embedding, so a batch
cannot simply be split into independently back-propagated chunks. GradCache splits
the computation at the embeddings instead:

1. embed every group (queries, positives, hard negatives) in mini-batches without
   building a graph, recording the random state before each mini-batch;
2. compute `InfoNCELoss` on the detached embeddings and back-propagate only to them,
   caching d loss / d embedding (the score matrix is small next to the encoder);
3. embed each mini-batch again with a graph, replaying its recorded random state so
   dropout draws the same masks, and back-propagate the cached gradient through it.

Gradients accumulate in the model's parameters exactly as one full-batch backward
would leave them, while activation memory is bounded by `mini_batch_size`. The price
is a second forward pass (about 20% more time in the paper).

Args:
    embed: `(input_ids, attention_mask) -> (rows, d)` pooled, not normalised, embeddings
        with a graph (e.g. `BiEncoder.embed`). Inputs are passed on the device they
        arrive on, so put them on the model's device.
    temperature, symmetric: as for `InfoNCELoss`.
    mini_batch_size: rows embedded at once in steps 1 and 3, a positive integer.
    gather: for training across processes, maps this process's embeddings of a group to
        the whole batch's, every process's rows in rank order, with gradients flowing back
        (`training.distributed.gather_with_grad`); step 2 then scores the global batch.
        None in a single process.
    no_sync: for training across processes, a context under which a backward pass only
        accumulates parameter gradients (DistributedDataParallel's `no_sync`); every
        replayed mini-batch but the last runs under it, so each process synchronises
        once per batch however many mini-batches it holds. None in a single process.

References:
    - Gao, Zhang, Han and Callan, 2021, "Scaling Deep Contrastive Learning Batch Size under
      Memory Limited Setup" (arXiv:2101.06983).

Inputs:
    queries and positives: `TokenBatch`es of B rows each; negatives: a `TokenBatch` of B*H
    rows, row-major (query i's negatives are rows i*H .. i*H+H-1), 1 <= H <= 20, or None;
    candidate_mask: `(B, B + B*H)` bool, as for `InfoNCELoss`; with `gather`, over the global batch.

Relations:
    - Same loss and gradients as `InfoNCELoss` on embeddings computed with the same
      random state; use `InfoNCELoss` when the whole batch fits in memory (it is faster).
    - sentence-transformers' CachedMultipleNegativesRankingLoss does the same, and also
      chunks the loss computation itself (left out here: the B x C score matrix is small).

Random state: the CPU generator and, when CUDA is in use, the generators of the input
tensors' devices and the current CUDA device are recorded and replayed, as
sentence-transformers' RandContext does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from training.losses.infonce import MAX_HARD_NEGATIVES, InfoNCELoss
from training.losses.output import LossOutput
from training.losses.token_batch import TokenBatch

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _RandomState:
    """The generators' states before one mini-batch was embedded, to replay its dropout exactly."""

    cpu: torch.Tensor
    cuda_devices: tuple[int, ...]
    cuda: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls, batch: TokenBatch) -> _RandomState:
        devices = {tensor.device.index for tensor in (batch.input_ids, batch.attention_mask) if tensor.is_cuda}
        if torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        ordered = tuple(sorted(devices))
        return cls(torch.get_rng_state(), ordered, tuple(torch.cuda.get_rng_state(device) for device in ordered))

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators' outer state is restored afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda_devices)):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class CachedInfoNCELoss:
    """`InfoNCELoss` whose `backward` embeds in mini-batches and accumulates exact gradients."""

    def __init__(
        self,
        embed: Embed,
        temperature: float = 0.05,
        symmetric: bool = False,
        mini_batch_size: int = 32,
        gather: Gather | None = None,
        no_sync: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        self.embed = embed
        self.loss = InfoNCELoss(temperature=temperature, symmetric=symmetric)
        self.mini_batch_size = mini_batch_size
        self.gather = gather
        self.no_sync = no_sync or nullcontext

    def _starts(self, batch: TokenBatch) -> range:
        return range(0, len(batch), self.mini_batch_size)

    def _embed_without_graph(self, batch: TokenBatch) -> tuple[torch.Tensor, list[_RandomState]]:
        chunks, states = [], []
        with torch.no_grad():
            for start in self._starts(batch):
                chunk = batch.rows(start, start + self.mini_batch_size)
                states.append(_RandomState.capture(chunk))
                chunks.append(self.embed(chunk.input_ids, chunk.attention_mask))
        return torch.cat(chunks), states

    def _replay_backward(self, groups: list[TokenBatch], grads: list[torch.Tensor], states: list[list[_RandomState]]) -> None:
        """Embed every mini-batch again and back-propagate its cached gradient; only the last one synchronises."""
        replays = [
            (batch.rows(start, start + self.mini_batch_size), grad[start : start + self.mini_batch_size], state)
            for batch, grad, group_states in zip(groups, grads, states)
            for start, state in zip(self._starts(batch), group_states)
        ]
        for number, (chunk, grad, state) in enumerate(replays, start=1):
            with nullcontext() if number == len(replays) else self.no_sync():
                with state.replay():
                    embeddings = self.embed(chunk.input_ids, chunk.attention_mask)
                embeddings.backward(grad)

    def backward(
        self,
        queries: TokenBatch,
        positives: TokenBatch,
        negatives: TokenBatch | None = None,
        candidate_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Accumulate the loss's gradients into the model's parameters; returns the detached loss."""
        batch_size = len(queries)
        if len(positives) != batch_size:
            raise ValueError(f"need one positive per query: {batch_size} queries, {len(positives)} positives")
        groups = [queries, positives]
        if negatives is not None:
            if len(negatives) % batch_size or not 1 <= len(negatives) // batch_size <= MAX_HARD_NEGATIVES:
                raise ValueError(
                    f"negatives must hold B*H rows (1 <= H <= {MAX_HARD_NEGATIVES} per query, row-major) "
                    f"for B = {batch_size}, got {len(negatives)} rows; pass None for no hard negatives"
                )
            groups.append(negatives)

        cached = [self._embed_without_graph(group) for group in groups]
        leaves = [embeddings.detach().requires_grad_() for embeddings, _ in cached]
        scored = [self.gather(leaf) for leaf in leaves] if self.gather else leaves
        hard = scored[2].view(len(scored[0]), len(negatives) // batch_size, -1) if negatives is not None else None
        output = self.loss.compute_loss_from_embeddings(scored[0], scored[1], hard, candidate_mask)
        output.loss.backward()

        self._replay_backward(groups, [leaf.grad for leaf in leaves], [states for _, states in cached])
        return LossOutput(loss=output.loss.detach(), masked=output.masked, scores=output.scores, documents=scored[1].detach())
