"""medidiff: one diffusion core for reconstruction, segmentation with uncertainty and anomaly detection."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# MONAI announces on import, at warning level, that its optional GPU DICOM decoder plugin is absent;
# pydicom's own decoders are used instead, so the notice is noise for medidiff's users.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin")
