package upload

// CheckReputations exposes checkReputations to the fuzz target.
var CheckReputations = checkReputations
