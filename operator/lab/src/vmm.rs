//! The lab's stand-in for a VMM: it relays frames between a VM's guest NIC (a tap in the guest
//! namespace) and the tap weft made for the VM in its launcher pod, as QEMU does with its tap
//! backend. A live migration attaches a second launcher tap (the target's) and switches the
//! guest over to it: only the active launcher tap carries the guest's frames.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// One guest NIC's relay.
pub struct Relay {
    guest: File,
    /// The launcher tap the guest is connected to now: its id and a handle to write to.
    active: Mutex<Option<(usize, File)>>,
    /// Launcher taps attached so far.
    taps: Mutex<usize>,
}

fn pump(mut from: File, mut on_frame: impl FnMut(&[u8]) + Send + 'static) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        // Ends when the tap goes away (its namespace is deleted, or DEL removed it).
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            on_frame(&buf[..n]);
        }
    });
}

impl Relay {
    /// A relay for the guest NIC opened as `guest`; its frames go nowhere until a launcher tap
    /// is activated.
    pub fn new(guest: File) -> std::io::Result<Arc<Relay>> {
        let relay = Arc::new(Relay {
            guest: guest.try_clone()?,
            active: Mutex::new(None),
            taps: Mutex::new(0),
        });
        let r = Arc::clone(&relay);
        pump(guest, move |frame| {
            if let Ok(mut a) = r.active.lock()
                && let Some((_, tap)) = a.as_mut()
            {
                // A frame the tap cannot take (its link is down: EIO) is dropped, as a NIC would.
                let _ = tap.write_all(frame);
            }
        });
        Ok(relay)
    }

    /// Attaches a launcher tap (opened as `tap`); returns its id. Its frames reach the guest
    /// only while it is the active one.
    pub fn attach(self: &Arc<Self>, tap: File) -> std::io::Result<usize> {
        let id = {
            let mut n = self
                .taps
                .lock()
                .map_err(|_| std::io::Error::other("relay poisoned"))?;
            *n += 1;
            *n
        };
        let writer = tap.try_clone()?;
        let mut guest = self.guest.try_clone()?;
        let r = Arc::clone(self);
        pump(tap, move |frame| {
            let active = r
                .active
                .lock()
                .ok()
                .and_then(|a| a.as_ref().map(|(i, _)| *i));
            if active == Some(id) {
                let _ = guest.write_all(frame);
            }
        });
        self.switch_to(id, writer)?;
        Ok(id)
    }

    /// Like [`Relay::attach`], but the guest stays where it is until [`Relay::switch_to`].
    pub fn attach_standby(self: &Arc<Self>, tap: File) -> std::io::Result<(usize, File)> {
        let current = self
            .active
            .lock()
            .map_err(|_| std::io::Error::other("relay poisoned"))?
            .take();
        let writer = tap.try_clone()?;
        let id = self.attach(tap)?;
        // `attach` made the new tap active: give the guest back to the current one.
        if let Some((old, file)) = current {
            self.switch_to(old, file)?;
        }
        Ok((id, writer))
    }

    /// Connects the guest to launcher tap `id` (written through `tap`).
    pub fn switch_to(&self, id: usize, tap: File) -> std::io::Result<()> {
        *self
            .active
            .lock()
            .map_err(|_| std::io::Error::other("relay poisoned"))? = Some((id, tap));
        Ok(())
    }
}
