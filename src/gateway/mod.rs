//! The public HTTPS gateway. (Being built.)
