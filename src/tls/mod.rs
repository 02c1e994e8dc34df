//! TLS for the public listener: certificates from files or self-signed, hot reload. (Being built.)
