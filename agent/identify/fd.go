package identify

// IdentifyFD is Identify for a raw descriptor the caller owns and keeps
// open (a fanotify permission event's): no *os.File is made, so nothing
// can close the descriptor behind the caller's back.
func (id *Identifier) IdentifyFD(fd int, path string) (Facts, error) {
	return id.identifyFD(fd, path)
}
