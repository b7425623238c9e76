//! Reading and writing `postern-proto` frames on QUIC streams.

use postern_proto::{DecodeError, Frame, HEADER_LEN};
use quinn::{ReadExactError, RecvStream, SendStream, WriteError};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed before a whole frame arrived.
    #[error("the stream ended before a whole frame arrived: {0}")]
    Read(#[from] ReadExactError),
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads exactly one frame from `recv`, and not a byte more.
///
/// The type and length in the header are checked against the frame type's limit before the
/// body is allocated or read.
pub async fn read_frame<F: Frame>(recv: &mut RecvStream) -> Result<F, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let mut frame = vec![0u8; F::frame_len(&header)?];
    frame[..HEADER_LEN].copy_from_slice(&header);
    recv.read_exact(&mut frame[HEADER_LEN..]).await?;
    match F::decode(&frame)? {
        Some((frame, _)) => Ok(frame),
        // `frame` holds exactly the length the header announced.
        None => Err(FrameError::Read(ReadExactError::FinishedEarly(frame.len()))),
    }
}

/// Writes one frame to `send`.
pub async fn write_frame(send: &mut SendStream, frame: &impl Frame) -> Result<(), WriteError> {
    send.write_all(&frame.encode()).await
}
