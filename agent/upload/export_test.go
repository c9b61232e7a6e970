package upload

// SetAfterPost sets a hook that runs when a batch's POST has returned,
// before its answer is used. Call it before Serve.
func SetAfterPost(u *Uploader, f func()) { u.afterPost = f }
