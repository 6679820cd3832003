//! The handshake's I/O: greet, read client flags, then read options one by one and carry out
//! what [`Negotiation::on_option`] decides.
//!
//! Guarantees: option data is read in full only up to [`MAX_OPTION_LEN`]; longer data (up to
//! [`MAX_OPTION_DRAIN`]) is skipped and answered with `NBD_REP_ERR_TOO_BIG`, anything larger
//! closes the connection. Every reply is flushed before the next option is read.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};

use crate::negotiate::{ExportMeta, Negotiation, Next};
use crate::proto::{
    opt_name, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_EXPORT_NAME,
};
use crate::{read_exact, read_exact_or_eof, skip, NbdError};

/// Longest option data the server reads (INFO/GO and meta-context requests are a few KiB
/// at most: names and queries are limited to 4 KiB each).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest option data the server skips to answer `NBD_REP_ERR_TOO_BIG` instead of closing.
pub const MAX_OPTION_DRAIN: u32 = 1 << 20;

/// Runs the handshake. Returns the chosen export and the negotiated state, or `None` when the
/// client aborted or went away between options.
pub async fn negotiate<S>(
    io: &mut BufStream<S>,
    exports: &[ExportMeta],
) -> Result<Option<(usize, Negotiation)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_u64(NBDMAGIC).await?;
    io.write_u64(IHAVEOPT).await?;
    io.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    io.flush().await?;

    let mut flags = [0u8; 4];
    read_exact(io, &mut flags, "client flags").await?;
    let mut neg = Negotiation::new(u32::from_be_bytes(flags))?;

    loop {
        let mut head = [0u8; 16];
        if !read_exact_or_eof(io, &mut head, "option header").await? {
            tracing::debug!("client closed the connection during option haggling");
            return Ok(None);
        }
        let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic(magic));
        }
        tracing::debug!(option = opt_name(opt), opt, len, "option");
        let step = if len > MAX_OPTION_LEN {
            if !neg.fixed() || opt == OPT_EXPORT_NAME || len > MAX_OPTION_DRAIN {
                return Err(NbdError::OptionTooLarge { option: opt, len });
            }
            skip(io, u64::from(len), "option data").await?;
            neg.too_big(opt)
        } else {
            let mut data = vec![0u8; usize::try_from(len).unwrap_or_default()];
            read_exact(io, &mut data, "option data").await?;
            neg.on_option(exports, opt, &data)
        };
        io.write_all(&step.reply).await?;
        io.flush().await?;
        match step.next {
            Next::Continue => {}
            Next::Transmit { export } => return Ok(Some((export, neg))),
            Next::Abort => {
                tracing::debug!("client aborted the handshake");
                return Ok(None);
            }
            Next::Fail(e) => return Err(e),
        }
    }
}
