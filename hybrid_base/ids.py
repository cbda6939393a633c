"""Reserved ids of every vocabulary (see ``hybrid.data.feature_map.Vocabulary``).

Id 0 is padding (never a real value, never counted), id 1 is out-of-vocabulary (a value not seen when the
feature map was fitted); known values start at 2.
"""
PAD_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2
