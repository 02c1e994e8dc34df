//! The one harness of the lab tests: namespaces and the lab topology, wireguard-go, processes
//! stopped by PID, the fake model and its request log, curl and the openai SDK as clients, and
//! the decision whether a test runs here at all. It never touches a namespace, interface or
//! process it did not create (everything carries this process's PID in its name or is held by
//! PID).

pub mod chain;
pub mod curl;
pub mod helper;
pub mod lab;
pub mod llama;
pub mod model;
pub mod netns;
pub mod prereq;
pub mod proc;
pub mod sdk;
pub mod site2;
