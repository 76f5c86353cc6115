//! Generated code for bridle's gRPC contracts. Nothing but generated code and
//! the descriptor set lives here; domain types belong to the crates that own them.

/// Encoded `FileDescriptorSet` of every bridle proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bridle_descriptor.bin"));

pub mod sandbox {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("bridle.sandbox.v1");
    }
}

pub mod control {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("bridle.control.v1");
    }
}
