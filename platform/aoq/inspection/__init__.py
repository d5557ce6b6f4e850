"""Looking inside a trained model: query it, browse its retrievals and hard negatives.

Plain PyTorch/NumPy (no Ray): ``aoq.cluster.serve`` serves the same queries over HTTP.
"""

from aoq.inspection.gallery import GalleryOptions, gallery_for_checkpoint, write_gallery
from aoq.inspection.index import SplitIndex, open_index
from aoq.inspection.query import Hit, QueryError, search_image, search_text

__all__ = [
    "GalleryOptions", "Hit", "QueryError", "SplitIndex", "gallery_for_checkpoint",
    "open_index", "search_image", "search_text", "write_gallery",
]
