"""Every pydantic model of Kiln: the project manifest, board types and the lab inventory, one
module per axis, every name re-exported here (``from kiln.schema import Project``).

YAML files hold instances only; this package is the truth. ``doit schema`` exports the JSON
Schema of the manifest, board files and lab inventories so editors complete every field.

| module          | what                                                                         |
|-----------------|------------------------------------------------------------------------------|
| ``base``        | ``Strict``: unknown keys are errors                                           |
| ``datasets``    | dataset formats (``Dataset``, by ``format``), split, augmentation              |
| ``frontends``   | front ends (``FrontEnd``, by ``kind``); shape/cost in kiln/frontends/<kind>.py  |
| ``nets``        | net families (``Architecture``, by ``family``); estimate in kiln/nets/<family>.py |
| ``compression`` | compression passes (``CompressionStep``, by the pass's name), ``Compression``   |
| ``tasks``       | tasks (classification, anomaly detection, regression; ``TASKS``, by objective) |
| ``project``     | ``Project`` (the manifest) and its sections: requirements, training, ...       |
| ``board``       | ``Board`` (a board type, targets/<board>.yaml)                                  |
| ``transports``  | transports (``Transport``, by ``kind``)                                         |
| ``lab``         | board instances and lab backends (``Lab``, by ``backend``)                       |

Extension axes are discriminated unions; each member is one registry entry whose
``implementation`` names the module that does the work, which ``kiln.registry`` imports when
the work runs. The core names those modules and never imports them, so layers stay one-way and
``doit list`` imports no torch or TVM.
"""

from kiln.schema.base import Strict
from kiln.schema.board import Board, Compute, Emulation
from kiln.schema.compression import (PASS_SETTINGS, PASSES, _STEPS, Compression, CompressionSearch, CompressionStep,
                                     PruneSettings, QuantizeSettings, WeightCodingSettings, _Step)
from kiln.schema.datasets import (GROUP_RULES, AudioFoldersDataset, Augment, CsvTableDataset, CsvWindowsDataset, Dataset,
                                  DigitsDataset, FolderSynthetic, GtsrbDataset, ImageFoldersDataset, Split, Synthetic,
                                  SpeechCommandsDataset, SpeechCommandsSynthetic, SyntheticDataset, _DatasetBase,
                                  _FrontEndShaped, _ImageDataset, _OwnData, dataset_class_names)
from kiln.schema.frontends import FrontEnd, LogmelFrontEnd, MfccFrontEnd, NormalizeFrontEnd, _FrontEndBase
from kiln.schema.lab import (EmulatedHosts, EmulatedLab, Instance, Inventory, Lab, LabgridLab, LabgridSSH, StaticLab,
                             _LabBase)
from kiln.schema.nets import (Architecture, AutoencoderArchitecture, CnnArchitecture, Conv1dArchitecture,
                              DsCnnArchitecture, FomoArchitecture, MlpArchitecture, MlperfAdArchitecture, MlperfIcArchitecture,
                              MlperfKwsArchitecture, MlperfVwwArchitecture, MobilenetV1Architecture, ModuleArchitecture,
                              OnnxArchitecture, ResnetArchitecture, RnnArchitecture, TfliteArchitecture,
                              _ArchitectureBase, _FamilyBase, parse_architecture)
from kiln.schema.project import (LatencyLimit, MemoryLimit, MinLimit, Project, Requirements, SizeLimit, Sizing, Training,
                                 Tuning, Validation)
from kiln.schema.tasks import TASKS, Anomaly, Classification, Detection, Regression, _TaskBase, judged_by, task_for
from kiln.schema.transports import LocalTransport, SerialTransport, SSHTransport, Transport

__all__ = [
    "Strict", "Board", "Compute", "Emulation", "PASS_SETTINGS", "PASSES", "Compression", "CompressionSearch",
    "CompressionStep", "PruneSettings", "QuantizeSettings", "WeightCodingSettings", "GROUP_RULES",
    "AudioFoldersDataset", "Augment", "CsvTableDataset", "CsvWindowsDataset", "Dataset", "DigitsDataset",
    "FolderSynthetic", "GtsrbDataset", "ImageFoldersDataset", "SpeechCommandsDataset", "SpeechCommandsSynthetic", "Split", "Synthetic", "SyntheticDataset",
    "dataset_class_names", "FrontEnd", "LogmelFrontEnd", "MfccFrontEnd", "NormalizeFrontEnd", "EmulatedHosts",
    "EmulatedLab", "Instance", "Inventory", "Lab", "LabgridLab", "LabgridSSH", "StaticLab", "Architecture",
    "AutoencoderArchitecture", "CnnArchitecture", "Conv1dArchitecture", "DsCnnArchitecture", "MlpArchitecture",
    "MlperfAdArchitecture", "MlperfIcArchitecture", "MlperfKwsArchitecture", "MlperfVwwArchitecture",
    "MobilenetV1Architecture", "FomoArchitecture", "ModuleArchitecture", "OnnxArchitecture", "ResnetArchitecture", "RnnArchitecture",
    "TfliteArchitecture", "parse_architecture", "LatencyLimit", "MemoryLimit", "MinLimit", "Project", "Requirements", "SizeLimit", "Sizing",
    "Training", "Tuning", "Validation", "Anomaly", "Classification", "Detection", "Regression", "TASKS", "task_for", "judged_by",
    "LocalTransport", "SerialTransport", "SSHTransport", "Transport",
]
