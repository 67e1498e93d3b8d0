"""Stage 1: the differentiable, group-wise aggregation search with the bridge loss."""

from .architect import Architect, Batch
from .config import OBJECTIVES, SearchConfig
from .network import SearchNetwork, teacher_features
from .result import GroupAggregation, SearchResult, load_search_result, save_search_result
from .searcher import run_search
from .session import AggregationSearch

__all__ = ["AggregationSearch", "Architect", "Batch", "GroupAggregation", "OBJECTIVES", "SearchConfig", "SearchNetwork",
           "SearchResult", "load_search_result", "run_search", "save_search_result", "teacher_features"]
