"""The distillation methods, one LightningModule per file, and :data:`METHODS`, the one list of them.

A new method is one file here (a subclass of :class:`DistillModule`, :class:`TeacherStudentModule` or
:class:`StagedModule` that declares only its own arguments and implements ``training_losses``), one line in
:data:`METHODS`, one config, and its tests; the CLI, the benchmark and the kill test find it through
:data:`METHODS`.
"""

from distill.methods.base import DistillModule, TrainingBatch
from distill.methods.teacher_student import TeacherStudentModule
from distill.methods.staged import StagedModule
from distill.methods.supervised import Supervised
from distill.methods.baseline_kd import BaselineKD
from distill.methods.teacher_assistant import TeacherAssistantKD
from distill.methods.residual_kd import ResidualKD
from distill.methods.patient import PatientConsistentKD
from distill.methods.dkd import DKD

#: Every method by its class name, in the order the benchmark and the kill test run them.
METHODS: dict[str, type[DistillModule]] = {cls.__name__: cls for cls in (
    Supervised,
    BaselineKD,
    TeacherAssistantKD,
    ResidualKD,
    PatientConsistentKD,
    DKD,
)}

__all__ = ["DistillModule", "TeacherStudentModule", "StagedModule", "TrainingBatch", "METHODS", *METHODS]
