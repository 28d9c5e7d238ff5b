//! The error type shared by the loss and estimator functions of [`crate::algo`].

use candle_core::Tensor;

/// What went wrong in a loss or estimator; every variant names the function at fault.
#[derive(Debug, thiserror::Error)]
pub enum AlgoError {
    /// A tensor operation failed inside `function`.
    #[error("{function}: tensor operation failed: {source}")]
    Tensor {
        function: &'static str,
        #[source]
        source: candle_core::Error,
    },
    /// Two inputs that must agree in shape do not.
    #[error("{function}: `{name}` has shape {got:?}, expected {expected}\nhint: {hint}")]
    Shape {
        function: &'static str,
        name: &'static str,
        got: Vec<usize>,
        expected: String,
        hint: &'static str,
    },
    /// A mask selects no element (or too few), so a mean or variance is undefined.
    #[error("{function}: the mask selects {count} element(s); {needed}\nhint: check that the mask marks the response tokens with 1")]
    EmptyMask {
        function: &'static str,
        count: f64,
        needed: &'static str,
    },
    /// A saved optimiser state does not fit the variables being trained.
    #[error("{function}: optimiser state {path}: {detail}\nhint: resume with the same trainable variables the checkpoint was written for")]
    OptimizerState {
        function: &'static str,
        path: String,
        detail: String,
    },
    /// A scalar parameter is out of its valid range.
    #[error("{function}: `{name}` = {value} is invalid; expected {expected}")]
    Parameter {
        function: &'static str,
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
}

/// Attaches the function name to candle errors: `tensor_op.map_err(at("gae"))?`.
pub(crate) fn at(function: &'static str) -> impl Fn(candle_core::Error) -> AlgoError {
    move |source| AlgoError::Tensor { function, source }
}

/// Fails unless `tensor` has exactly the shape `expected`.
pub(crate) fn expect_shape(
    function: &'static str,
    name: &'static str,
    tensor: &Tensor,
    expected: &[usize],
    hint: &'static str,
) -> Result<(), AlgoError> {
    if tensor.dims() == expected {
        return Ok(());
    }
    Err(AlgoError::Shape {
        function,
        name,
        got: tensor.dims().to_vec(),
        expected: format!("{expected:?}"),
        hint,
    })
}

/// Fails unless `tensor` has rank `rank`; returns its dims.
pub(crate) fn expect_rank<'t>(
    function: &'static str,
    name: &'static str,
    tensor: &'t Tensor,
    rank: usize,
    hint: &'static str,
) -> Result<&'t [usize], AlgoError> {
    if tensor.rank() == rank {
        return Ok(tensor.dims());
    }
    Err(AlgoError::Shape {
        function,
        name,
        got: tensor.dims().to_vec(),
        expected: format!("a tensor of rank {rank}"),
        hint,
    })
}

/// Fails unless `value` lies in the closed interval `[low, high]`.
pub(crate) fn expect_in_range(
    function: &'static str,
    name: &'static str,
    value: f64,
    low: f64,
    high: f64,
    expected: &'static str,
) -> Result<(), AlgoError> {
    if value.is_finite() && value >= low && value <= high {
        return Ok(());
    }
    Err(AlgoError::Parameter {
        function,
        name,
        value,
        expected,
    })
}
