<?php
namespace App\Lib;

final class Greeting
{
    public static function line(): string
    {
        return 'kiln example app OK';
    }
}
