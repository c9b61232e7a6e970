package identify

// IdentifyFD is IdentifyFile for a raw descriptor the caller owns and
// keeps open (a fanotify permission event's), whose path it knows. A
// large file not seen before gives ErrDeferred at once and is not hashed
// here: the exec path's own event for that execution hashes it in the
// background, so a later execution finds it in the cache.
func (id *Identifier) IdentifyFD(fd int, path string) (Facts, error) {
	f, job, err := id.IdentifyFile(fd, func() string { return path })
	if job != nil {
		job.Close()
	}
	return f, err
}
