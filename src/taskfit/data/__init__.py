"""Reading the user's data files into `Example`s."""

from taskfit.data.example import Example, LazyExamples
from taskfit.data.readers import read_records

__all__ = ["Example", "LazyExamples", "read_records"]
