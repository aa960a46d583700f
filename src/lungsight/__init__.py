"""lungsight: COVID-19 / pneumonia / normal detection on chest CT series and X-rays, with its evidence.

Research and triage aid only - not a medical device.

>>> import lungsight
>>> study = lungsight.load_study("series_folder/")              # doctest: +SKIP
>>> detector = lungsight.Detector.from_pretrained("ct-default")  # doctest: +SKIP
>>> prediction = detector.predict(study)                         # doctest: +SKIP
>>> prediction.save("out/")                                       # doctest: +SKIP
"""

from lungsight.about import DISCLAIMER, __version__
from lungsight.errors import LungsightError
from lungsight.inference.detector import Detector, Prediction
from lungsight.io import load_study
from lungsight.study import Study

__all__ = ["DISCLAIMER", "Detector", "LungsightError", "Prediction", "Study", "__version__", "load_study"]
