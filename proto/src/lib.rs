//! Generated code for bridle's gRPC contracts. Besides generated code and the
//! descriptor set, only the one part of the agent's contract that is not
//! protobuf lives here ([`handshake`]), so that both ends share it; domain
//! types belong to the crates that own them.

pub mod handshake;

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
