package cloud

// CheckReputations exposes checkReputations to the fuzz target.
var CheckReputations = checkReputations

// SetBeforeRequest sets a hook that runs when a request carrying
// statistics or hashes is about to be made, before its checks.
func SetBeforeRequest(in *Installation, f func()) { in.beforeRequest = f }
