"""The distillation methods, one LightningModule per file, all sharing :class:`DistillModule`."""

from distill.methods.base import DistillModule
from distill.methods.baseline_kd import BaselineKD
from distill.methods.patient import PatientConsistentKD
from distill.methods.supervised import Supervised
from distill.methods.residual_kd import ResidualKD
from distill.methods.teacher_assistant import TeacherAssistantKD

__all__ = ["DistillModule", "Supervised", "BaselineKD", "TeacherAssistantKD", "ResidualKD",
           "PatientConsistentKD"]
