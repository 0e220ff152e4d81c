"""Interoperation with other libraries' formats (diffusers). Imported on use: each module needs its extra."""
