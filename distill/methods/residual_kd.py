"""ResidualKD: Gao et al., "Residual Error Based Knowledge Distillation" (arXiv 2002.09168; Neurocomputing 2021).

Not Relational KD (Park et al. 2019), which is also abbreviated RKD. No public implementation of the
paper exists; every choice the paper leaves open is marked "our choice" below and in docs/methods.md.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from distill.errors import ConfigError
from distill.losses import feature_mse, mean_norm
from distill.methods.base import TrainingBatch
from distill.methods.staged import StagedModule
from distill.models.residual import Connector, ResidualPair, connector
from distill.models.budget import PairCost, derive_pair, pair_cost
from distill.teachers import NetworkSpec

SCHEMES = ("m1", "m2", "m3")
CLASSIFIERS = ("teacher", "trained")
#: Names of the two predictions that validation and test report (S alone, S+A).
VIEWS = ("student", "student_assistant")


def _weighted_sum(weights: list[float], terms: list[Tensor]) -> Tensor:
    """``Σ wᵢ·termᵢ`` over the matched blocks (a single weight of 1 for M.1 and M.3)."""
    return sum(w * term for w, term in zip(weights, terms))


class StudentAlone(nn.Module):
    """S's prediction through the pair's connector and classifier (built on the fly, never stored)."""

    def __init__(self, pair: ResidualPair) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, images: Tensor) -> Tensor:
        return self.pair.student_logits(images)


class ResidualKD(StagedModule):
    """A student S mimics the teacher's final feature map; an assistant A learns what S misses.

    **M.1 (the paper's §3.2; ``scheme: m1``).** Two stages. Stage 1 trains S (and its connector) on
    ``L_S = ‖c_S(f_S) − f_T‖²``; stage 2 freezes S (no gradients, eval mode, out of the optimiser) and
    trains A, which reads the image, on ``L_A = ‖c_A(f_A) − (f_T − c_S(f_S))‖²``, the residual computed
    from the frozen S. Only one of S and A is optimised in each stage. Prediction: ``head(c_S(f_S) +
    c_A(f_A))``. ``f`` are final feature maps (the map the classifier pools), ``c`` connectors
    (1×1 conv + resize, or linear for vectors) where S's or A's map differs from the teacher's.

    **M.2 (progressive; ``scheme: m2``) — our definition**, the paper's was not retrievable: the same
    two stages, but every stage (block) ``i`` of the networks is matched, shallow to deep. Stage 1
    trains S on ``Σ_{i≤k} ‖c^S_i(f^S_i) − f^T_i‖²``, stage 2 trains A on ``Σ_{i≤k} ‖c^A_i(f^A_i) −
    (f^T_i − c^S_i(f^S_i))‖²``; within each stage ``k`` grows from 1 to K (the number of blocks)
    evenly over its epochs (epoch e of E uses ``k = 1 + ⌊e·K/E⌋``, so the last epochs train every
    block). Intermediate connectors serve training only; the predictor is M.1's. T, S and A need the
    same number of blocks, and each stage at least K epochs.

    **M.3 (A integrated into S, end to end; ``scheme: m3``) — our definition**: one stage in which S and
    A are one network trained jointly on ``L_S + L_A = ‖c_S(f_S) − f_T‖² + ‖c_A(f_A) − (f_T − c_S(f_S))‖²``
    with gradients of ``L_A`` flowing into S too (``L_A = ‖c_S(f_S) + c_A(f_A) − f_T‖²``, the whole
    predictor's error, so S+A is optimised end to end while ``L_S`` keeps S a predictor of its own).
    A still reads the image, so FLOPs and export are M.1's.

    **Classifier.** The paper leaves the classifier out of distillation because S and T share its
    structure: by default (``classifier: teacher``) the teacher's classifier is copied into the pair
    and frozen (it must be global average pooling + one linear layer, as in every zoo network; checked
    at start-up). ``classifier: trained`` learns a fresh one with cross-entropy on the hard labels
    (weight ``ce_weight``) on detached features, so S's and A's objectives stay the paper's.

    **S and A.** With ``assistant: null`` (default) both are derived from the given network
    ``student`` (+ ``student_kwargs``) by width so that FLOPs(S+A), connectors and classifier included,
    stay within FLOPs(``student``) and FLOPs(A) ≈ ``assistant_ratio`` · FLOPs(S) (see
    :mod:`distill.models.budget`). With ``assistant`` given, ``student``/``student_kwargs`` and
    ``assistant``/``assistant_kwargs`` are S and A as they are (no budget).

    **Stages and selection.** Each stage gets a fresh optimiser and schedule from the recipe and keeps
    its best-validation weights (stage 1 selects on S alone, stage 2 and M.3 on S+A); the next stage
    starts from them. Validation logs S+A as ``val/acc`` (with teacher agreement/KL) and S alone as
    ``val/acc_student``; the final test reports both (``results.json`` ``stages``: ``student`` and
    ``student_assistant``; the top level is S+A). Training logs ``train/residual_norm`` =
    ``‖f_T − c_S(f_S)‖`` and ``train/remaining_norm`` = ``‖f_T − c_S(f_S) − c_A(f_A)‖`` (per-sample
    l2 norms, batch mean). The exported ``model.safetensors`` is the whole S+A predictor
    (``residual_pair``), usable as a teacher.

    Args:
        stage_epochs: epochs per stage: ``[S, A]`` for m1/m2, ``[joint]`` for m3.
        scheme: ``m1``, ``m2`` or ``m3``.
        assistant, assistant_kwargs: A's zoo name and options; null derives S and A from ``student``.
        assistant_ratio: FLOPs(A) / FLOPs(S) when deriving (the paper: A about 1/10 of S).
        classifier: ``teacher`` (frozen copy, default) or ``trained``.
        ce_weight: weight of the cross-entropy of a trained classifier.
        **kwargs: ``student`` (the given network to derive S and A from, or S itself when ``assistant`` is
            given), ``teacher`` (one network that exposes feature maps), optimiser and schedule.
    """

    STATE_KEY = "residual_kd"

    def __init__(
        self,
        *,
        stage_epochs: list[int],
        scheme: str = "m1",
        assistant: str | None = None,
        assistant_kwargs: dict[str, Any] | None = None,
        assistant_ratio: float = 0.1,
        classifier: str = "teacher",
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)} (the paper's M.1/M.2/M.3), got {scheme!r}")
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"classifier must be 'teacher' (frozen, the paper's) or 'trained', got {classifier!r}")
        if not ce_weight >= 0:
            raise ConfigError(f"ce_weight must be >= 0, got {ce_weight}")
        self.stage_names = ["joint"] if scheme == "m3" else ["student", "assistant"]
        if len(stage_epochs) != len(self.stage_names) or min(stage_epochs) < 1:
            raise ConfigError(f"stage_epochs needs {len(self.stage_names)} positive entries for scheme {scheme} "
                              f"({', '.join(self.stage_names)}); got {list(stage_epochs)}.")
        # The given network is built here (and only used as the FLOPs reference); the pair replaces it.
        super().__init__(**kwargs)
        hp = self.hparams
        student, student_kwargs = hp.student, hp.student_kwargs
        num_classes, in_channels, image_size = hp.num_classes, hp.in_channels, hp.image_size
        self.teacher_shapes = self._feature_shapes(self.teacher, "the teacher")
        target = self.teacher_shapes[-1]
        if assistant is None:
            pair_kwargs = derive_pair(student, student_kwargs, target, num_classes, in_channels, image_size,
                                      assistant_ratio=assistant_ratio)
        else:
            pair_kwargs = {"student": student, "student_kwargs": dict(student_kwargs or {}), "assistant": assistant,
                           "assistant_kwargs": dict(assistant_kwargs or {}), "target_shape": list(target)}
        self._given = [self.student] if assistant is None else []  # the FLOPs reference (a list: not a submodule)
        #: The trained network is the whole S+A predictor: it is what `student_network()` exports.
        self.student_spec = NetworkSpec("residual_pair", num_classes, in_channels, image_size, pair_kwargs)
        self.student: ResidualPair = self.student_spec.build()  # type: ignore[assignment]
        if classifier == "teacher":
            self._copy_teacher_classifier()
        self.block_connectors = self._block_connectors() if scheme == "m2" else nn.ModuleDict()
        self.val_acc_student = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.stage_ends = [sum(stage_epochs[: i + 1]) for i in range(len(stage_epochs))]
        self.view: str | None = None  # set by select_stage for the final tests
        self.stage_records: dict[str, dict[str, Any]] = {
            view: {"stage": view, "model": "residual_pair", "prediction": "S alone" if view == "student" else "S+A",
                   "best_val_acc": None}
            for view in VIEWS
        }
        self.stage_records["student_assistant"]["pair"] = pair_kwargs
        self._best_student_score: float | None = None
        self._silent_key: tuple[tuple[int, int], ...] | None = None  # see _assistant_silent
        self._silent = False
        self.enter_stage(0)

    # ------------------------------------------------------------------------------ construction
    def _feature_shapes(self, network: nn.Module, what: str) -> list[tuple[int, ...]]:
        if not getattr(network, "supports_features", True) or not hasattr(network, "forward_features"):
            raise ConfigError(f"{what} ({getattr(network, 'model_name', None) or type(network).__name__}) exposes no "
                              "feature map (forward_features); ResidualKD distils feature maps: choose a network "
                              "with stage features (see docs/data-and-models.md, Models).")
        size = self.hparams.image_size or 32
        device = next(network.parameters()).device
        with torch.no_grad():
            was_training = network.training
            feats = network.eval().forward_features(torch.zeros(1, self.hparams.in_channels, size, size, device=device))
            network.train(was_training)
        return [tuple(int(d) for d in f.shape[1:]) for f in feats]

    def _copy_teacher_classifier(self) -> None:
        """The teacher's classifier, frozen, as the pair's head (checked to compute the same function)."""
        channels, classes = self.teacher_shapes[-1][0], self.hparams.num_classes
        linears = [m for m in self.teacher.modules()
                   if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (channels, classes)]
        head = self.student.head
        if linears:
            head.fc.load_state_dict(linears[-1].state_dict())
        probe = torch.randn(2, *self.teacher_shapes[-1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = bool(linears) and torch.allclose(head(probe), self.teacher.forward_head(probe), atol=1e-5, rtol=1e-4)
        if not same:
            raise ConfigError(f"the teacher's classifier ({type(self.teacher).__name__}.forward_head) is not global "
                              "average pooling + one linear layer, so it cannot be shared with S and A; set "
                              "`classifier: trained`.")
        head.requires_grad_(False)

    def _block_connectors(self) -> nn.ModuleDict:
        """M.2: connectors of S's and A's intermediate blocks to the teacher's (training only)."""
        pair = self.student
        s_shapes = self._feature_shapes(pair.student, "the student")
        a_shapes = self._feature_shapes(pair.assistant, "the assistant")
        if not len(s_shapes) == len(a_shapes) == len(self.teacher_shapes):
            raise ConfigError(f"scheme m2 matches every block, but the teacher has {len(self.teacher_shapes)} blocks, "
                              f"S {len(s_shapes)} and A {len(a_shapes)}; use networks with as many stages, or m1.")
        if min(self.hparams.stage_epochs) < len(s_shapes):
            raise ConfigError(f"scheme m2 adds one block at a time: every stage needs at least {len(s_shapes)} epochs "
                              f"(one per block), got stage_epochs={list(self.hparams.stage_epochs)}.")
        blocks = list(zip(s_shapes, a_shapes, self.teacher_shapes))[:-1]
        return nn.ModuleDict({
            "student": nn.ModuleList(connector(s, t) for s, _, t in blocks),
            "assistant": nn.ModuleList(connector(a, t) for _, a, t in blocks),
        })

    # ------------------------------------------------------------------------------ stages
    @property
    def stage_name(self) -> str:
        return self.stage_names[self.stage]

    def _parts(self, role: str) -> list[nn.Module]:
        """S or A with everything that belongs to it: its body and its connectors."""
        pair = self.student
        parts = [pair.student, pair.student_connector] if role == "student" else [pair.assistant, pair.assistant_connector]
        if role in self.block_connectors:
            parts.append(self.block_connectors[role])
        return parts

    def trainable_modules(self) -> list[nn.Module]:
        roles = ["student", "assistant"] if self.stage_name == "joint" else [self.stage_name]
        modules = [m for role in roles for m in self._parts(role)]
        if self.hparams.classifier == "trained":
            modules.append(self.student.head)
        return modules

    def _frozen_role(self) -> str | None:
        return {"student": "assistant", "assistant": "student"}.get(self.stage_name)

    def frozen_modules(self) -> list[nn.Module]:
        frozen = self._frozen_role()
        return self._parts(frozen) if frozen is not None else []

    def enter_stage(self, index: int) -> None:
        super().enter_stage(index)
        self.student.freeze_unused()

    def _block_weights(self) -> list[float]:
        """Loss weight of each matched block, shallow to deep: ``[1]`` (the final map) for m1/m3.

        M.2 trains the ``k = 1 + ⌊e·K/E⌋`` shallowest of K blocks in epoch e of a stage of E epochs; the
        others enter with weight 0, so every parameter stays in the graph (DDP requires it).
        """
        if self.hparams.scheme != "m2":
            return [1.0]
        start = self.stage_ends[self.stage - 1] if self.stage else 0
        epochs, blocks = self.hparams.stage_epochs[self.stage], len(self.teacher_shapes)
        used = min(blocks, 1 + max(0, self.current_epoch - start) * blocks // epochs)
        return [1.0 if i < used else 0.0 for i in range(blocks)]

    # ------------------------------------------------------------------------------ training
    def _mapped(self, role: str, images: Tensor) -> list[Tensor]:
        """S's or A's matched block features in the teacher's space, the final one last (only it for m1/m3)."""
        pair = self.student
        network = pair.student if role == "student" else pair.assistant
        final = pair.student_connector if role == "student" else pair.assistant_connector
        feats = network.forward_features(images)
        inner = [c(f) for c, f in zip(self.block_connectors[role], feats[:-1])] if role in self.block_connectors else []
        return inner + [final(feats[-1])]

    def _assistant_silent(self) -> bool:
        """Whether ``c_A(f_A)`` is exactly zero: A's connector still at its zero start (stage 1, where A
        is frozen). Checked again only when the connector's tensors change (new tensors, or in-place
        writes such as a checkpoint load, which bump their version counters)."""
        connector = self.student.assistant_connector
        if not isinstance(connector, Connector):
            return False
        params = list(connector.parameters())
        key = tuple((id(p), p._version) for p in params)
        if key != self._silent_key:
            self._silent_key, self._silent = key, not any(bool(p.detach().any()) for p in params)
        return self._silent

    def training_losses(self, batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch.images, batch.labels
        weights = self._block_weights()
        with torch.no_grad():
            teacher = self.teacher.forward_features(images)[-len(weights):]
        stage, head = self.stage_name, self.student.head
        # In stage 2 S is frozen: the residual target comes from it without a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "assistant"):
            s_maps = self._mapped("student", images)
        losses: dict[str, Tensor] = {}
        if stage != "assistant":
            losses["loss_student"] = _weighted_sum(weights, [feature_mse(s, t) for s, t in zip(s_maps, teacher)])
        a_final: Tensor | None = None  # None: exactly zero
        if stage == "student":
            if not self._assistant_silent():  # A's part of the logged remaining norm (no forward pass when zero)
                with torch.no_grad():
                    a_final = self.student.assistant_feature(images)
        else:
            a_maps = self._mapped("assistant", images)
            losses["loss_assistant"] = _weighted_sum(weights, [feature_mse(a, t - s)
                                                               for a, s, t in zip(a_maps, s_maps, teacher)])
            a_final = a_maps[-1]
        s_final = s_maps[-1]
        feature = s_final if stage == "student" else s_final + a_final  # the predictor this stage trains
        # the head sees the feature without its graph: the feature losses train S and A, and only a
        # trained classifier learns from the logits (its CE term)
        logits = head(feature.detach())
        if self.hparams.classifier == "trained":
            losses["loss_ce"] = self.hparams.ce_weight * F.cross_entropy(logits.float(), labels)
        residual = teacher[-1] - s_final.detach()
        residual_norm = mean_norm(residual)
        remaining_norm = residual_norm if a_final is None else mean_norm(residual - a_final.detach())
        return logits, {"loss": sum(losses.values()), **losses, "residual_norm": residual_norm,
                        "remaining_norm": remaining_norm}

    def _stage_view(self) -> str:
        return "student" if self.stage_name == "student" else "student_assistant"

    def record_stage(self, best_score: float | None) -> None:
        """Records the validation accuracy of the stage's best weights (loaded now)."""
        if self.stage_name == "student":
            # until A is trained, S+A is S plus an untrained (zero-connected) assistant
            self.stage_records["student"]["best_val_acc"] = self._best_score
        elif self.stage_name == "joint":
            self.stage_records["student"]["best_val_acc"] = self._best_student_score
        self.stage_records[self._stage_view()]["best_val_acc"] = best_score

    def trained_state(self) -> dict[str, Tensor]:
        state = {f"pair.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"blocks.{k}": v for k, v in self.block_connectors.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        self.student.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("pair.")})
        self.block_connectors.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("blocks.")})

    # ------------------------------------------------------------------------------ evaluation
    def active_network(self) -> nn.Module:
        # During fit `val/acc` is S+A and `val/acc_student` S alone; the final tests select each in turn.
        return StudentAlone(self.student) if self.view == "student" else self.student

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.view is None:
            images, labels, _ = batch
            self.val_acc_student(self.student.student_logits(images), labels)
            self.log("val/acc_student", self.val_acc_student, batch_size=images.shape[0])

    def stage_score(self) -> float:
        """Stage 1 selects on S alone, stage 2 and M.3 on S+A."""
        self._student_score = self.val_acc_student.compute().item()
        return self._student_score if self.stage_name == "student" else super().stage_score()

    def on_best_validation(self) -> None:
        self._best_student_score = self._student_score

    def evaluation_stages(self) -> list[str]:
        return list(VIEWS)

    def select_stage(self, name: str) -> dict[str, Any]:
        """Makes ``name`` (S alone, or S+A) the prediction that test evaluates; returns its record."""
        self.view = name
        self.log_prefix = f"{name}/"
        if name == "student_assistant":
            self.stage_records[name]["cost"] = self.cost().rows
        return self.stage_records[name]

    def cost(self) -> PairCost:
        """Params and FLOPs of S, A, S+A (and of the given network S and A were derived from)."""
        given = self._given[0].cpu() if self._given else None
        return pair_cost(copy.deepcopy(self.student).cpu().float().eval(), given, self.hparams.in_channels,
                         self.hparams.image_size or 32)

    # ------------------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {"best_student_score": self._best_student_score}

    def _load_extra_state(self, saved: dict[str, Any]) -> None:
        self._best_student_score = saved["best_student_score"]


__all__ = ["ResidualKD"]
