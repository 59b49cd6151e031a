"""io.numpy_of / io.arrow_of: pyarrow's numpy conversions without pyarrow's pandas shim, the same
values as pyarrow's own ``to_numpy`` / ``pa.array``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hats_margin.io import arrow_of, numpy_of

NUMBERS = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
           pa.float32(), pa.float64()]


@pytest.mark.parametrize("arrow_type", NUMBERS, ids=str)
def test_numbers_read_from_the_buffer_equal_to_numpy(arrow_type):
    rng = np.random.default_rng(7)
    dtype = arrow_type.to_pandas_dtype()
    values = (rng.integers(0, 100, 1000) if np.issubdtype(dtype, np.integer) else rng.normal(size=1000)).astype(dtype)
    whole = pa.array(values, type=arrow_type)
    for array in (whole, whole.slice(0, 0), whole.slice(3, 500), whole.slice(999)):  # offsets into the buffer
        got = numpy_of(array)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, array.to_numpy())
    chunked = pa.chunked_array([whole.slice(5, 10), whole.slice(100, 7), whole.slice(0, 0)])
    np.testing.assert_array_equal(numpy_of(chunked), chunked.to_numpy())
    np.testing.assert_array_equal(numpy_of(pa.chunked_array([whole.slice(17, 40)])), values[17:57])
    back = arrow_of(values[1::3])  # not contiguous: copied
    assert back.type == arrow_type and back.to_pylist() == values[1::3].tolist()


def test_nulls_and_other_types_go_through_pyarrow():
    with_null = pa.array([1.5, None, 2.5])
    got = numpy_of(with_null)
    assert np.isnan(got[1]) and got[[0, 2]].tolist() == [1.5, 2.5]
    assert numpy_of(pa.array([True, False])).tolist() == [True, False]
    assert numpy_of(pa.chunked_array([pa.array([1, None])])).tolist()[0] == 1
    assert numpy_of(pa.chunked_array([], type=pa.int64())).size == 0
    assert arrow_of(np.array([True, False])).type == pa.bool_()
    assert arrow_of(np.array([], dtype=np.int64)).to_pylist() == []
