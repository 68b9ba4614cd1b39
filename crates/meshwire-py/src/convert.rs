//! Conversions between JSON values and Python objects.

use crate::errors::{new_err, Kind};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString};
use serde_json::Value;

/// A JSON value as the Python object `json.loads` would give (object key
/// order kept).
pub fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                PyInt::new(py, u).into_any()
            } else if let Some(i) = n.as_i64() {
                PyInt::new(py, i).into_any()
            } else {
                PyFloat::new(py, n.as_f64().unwrap_or(f64::NAN)).into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, json_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

static DUMPS: PyOnceLock<(Py<PyAny>, Py<PyDict>)> = PyOnceLock::new();

/// `json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
/// allow_nan=False)`: the bytes `JSON.stringify` gives for the same value.
/// Raises what `json.dumps` raises (`TypeError` for objects JSON cannot
/// hold, `ValueError` for NaN and circular references).
pub fn dumps(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    let (dumps, kwargs) = DUMPS.get_or_try_init(py, || -> PyResult<_> {
        let dumps = py.import("json")?.getattr("dumps")?.unbind();
        let kwargs = PyDict::new(py);
        kwargs.set_item("separators", (",", ":"))?;
        kwargs.set_item("ensure_ascii", false)?;
        kwargs.set_item("allow_nan", false)?;
        Ok((dumps, kwargs.unbind()))
    })?;
    let text = dumps.bind(py).call((obj,), Some(kwargs.bind(py)))?;
    Ok(text.cast::<PyString>()?.to_cow()?.into_owned())
}

/// A Python object as a JSON value (through [`dumps`]).
pub fn py_to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let text = dumps(obj)?;
    serde_json::from_str(&text).map_err(|e| new_err(Kind::Protocol, format!("JSON: {e}")))
}

type Build = Box<dyn for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>> + Send>;

/// A result built only once the interpreter is attached (futures finish on
/// runtime threads, their values are converted under the GIL).
pub struct Deferred(Build);

impl Deferred {
    pub fn new(build: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>> + Send + 'static) -> Self {
        Self(Box::new(build))
    }
}

impl<'py> IntoPyObject<'py> for Deferred {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        (self.0)(py)
    }
}
