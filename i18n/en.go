package i18n

// en is the English catalog: English messages are their own keys, so it
// holds only the messages whose words depend on a number.
var en = Catalog{
	Plurals: map[Key]Forms{
		"Installed cloudprotect in %s (%d files written).\n": {Arg: 2,
			One:   "Installed cloudprotect in %s (%d file written).\n",
			Other: "Installed cloudprotect in %s (%d files written).\n"},
		"Removed cloudprotect from %s (%d files).\n": {Arg: 2,
			One:   "Removed cloudprotect from %s (%d file).\n",
			Other: "Removed cloudprotect from %s (%d files).\n"},
	},
}
