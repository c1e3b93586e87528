//! (being written)
pub async fn run(_args: crate::ControllerArgs) -> crate::Result<()> {
    Ok(())
}
