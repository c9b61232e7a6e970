package upload

// CheckReputations exposes checkReputations to the fuzz target.
var CheckReputations = checkReputations

// SetAfterPost sets a hook that runs when a batch's POST has returned,
// before its answer is used. Call it before Serve.
func SetAfterPost(u *Uploader, f func()) { u.afterPost = f }
